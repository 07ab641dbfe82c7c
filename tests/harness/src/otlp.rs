//! An OTLP trace receiver inside a network namespace, for the tracing tests
//! (tests/e2e/proxy_tracing.rs) and the L7 bench's tracing setups (benches/l7.rs): OTLP/gRPC
//! (the `TraceService` generated in `sigil-proto`, served by tonic over hyper's HTTP/2) on one
//! port and OTLP/HTTP (`POST /v1/traces`, `application/x-protobuf`) on another, as an
//! OpenTelemetry Collector's `otlp` receiver listens on 4317 and 4318. It keeps every span with
//! its resource's `service.name` and every export request's raw protobuf bytes (or, for the
//! bench, only counts the spans); it can also play a dead collector ([`OtlpReceiver::stop`]) and
//! one that accepts connections and never answers ([`OtlpReceiver::black_hole`]).
//!
//! Its connections are served by tasks it owns, so stopping it closes them too: an exporter that
//! held one sees it go away, as when a collector's pod dies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use sigil_proto::opentelemetry::proto::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use sigil_proto::opentelemetry::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use sigil_proto::opentelemetry::proto::common::v1::KeyValue;
use sigil_proto::opentelemetry::proto::common::v1::any_value::Value as AnyValue;
use sigil_proto::opentelemetry::proto::trace::v1::Span;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::hex;
use crate::netns::Netns;

/// The OTLP/gRPC port (the Collector's default).
pub const OTLP_GRPC_PORT: u16 = 4317;
/// The OTLP/HTTP port (the Collector's default).
pub const OTLP_HTTP_PORT: u16 = 4318;
/// The OTLP/HTTP path for traces.
pub const OTLP_HTTP_TRACES_PATH: &str = "/v1/traces";
/// The gRPC method every OTLP/gRPC trace export calls.
const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// What the receiver keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Every span and every request's bytes (the tests).
    Everything,
    /// Only how many spans and requests arrived (the bench: export costs the exporter what it
    /// costs with a real collector, and the receiver's memory stays flat).
    Counts,
}

/// Which OTLP transport an export came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    HttpProtobuf,
}

/// One span as it arrived, with the `service.name` of the resource it was exported under.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub service: String,
    pub transport: Transport,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent's span id in hex; empty for a root span.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// An attribute's value as text (strings as they are, numbers and booleans printed).
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }
}

/// One export request's protobuf bytes (an `ExportTraceServiceRequest`), as the exporter sent
/// them (for gRPC, the message inside the length-prefixed frame).
#[derive(Clone, Debug)]
pub struct RawExport {
    pub transport: Transport,
    pub bytes: Bytes,
}

/// A value of `attributes` as text.
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// The spans of `request`, each with its resource's `service.name`.
pub fn spans_of(request: &ExportTraceServiceRequest, transport: Transport) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for resource_spans in &request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|r| attribute(&r.attributes, "service.name"))
            .unwrap_or_default();
        for scope_spans in &resource_spans.scope_spans {
            spans.extend(scope_spans.spans.iter().map(|span| ReceivedSpan {
                service: service.clone(),
                transport,
                span: span.clone(),
            }));
        }
    }
    spans
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    raw: Mutex<Vec<RawExport>>,
    span_count: AtomicU64,
    requests: AtomicU64,
}

impl Received {
    fn record(
        &self,
        keep: Keep,
        transport: Transport,
        bytes: Bytes,
    ) -> Result<(), prost::DecodeError> {
        let request = ExportTraceServiceRequest::decode(bytes.clone())?;
        let spans = spans_of(&request, transport);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.span_count
            .fetch_add(spans.len() as u64, Ordering::Relaxed);
        if keep == Keep::Everything {
            self.raw
                .lock()
                .unwrap()
                .push(RawExport { transport, bytes });
            self.spans.lock().unwrap().extend(spans);
        }
        Ok(())
    }
}

/// The gRPC service: the raw bytes were recorded before tonic decoded them (see `serve_grpc`).
struct Collector;

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        _request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver: see the module doc. Stops on drop.
pub struct OtlpReceiver {
    received: Arc<Received>,
    keep: Keep,
    grpc_port: u16,
    http_port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Serves OTLP/gRPC on 0.0.0.0:`grpc_port` and OTLP/HTTP on 0.0.0.0:`http_port` in `netns`.
    pub fn start(netns: &Netns, grpc_port: u16, http_port: u16, keep: Keep) -> OtlpReceiver {
        let mut receiver = OtlpReceiver {
            received: Arc::new(Received::default()),
            keep,
            grpc_port,
            http_port,
            tasks: Vec::new(),
        };
        receiver.serve(netns);
        receiver
    }

    fn serve(&mut self, netns: &Netns) {
        let grpc = netns.listen(self.grpc_port);
        let http = netns.listen(self.http_port);
        let (received, keep) = (self.received.clone(), self.keep);
        self.tasks.push(tokio::spawn(accept(grpc, move |stream| {
            serve_grpc(stream, received.clone(), keep)
        })));
        let (received, keep) = (self.received.clone(), self.keep);
        self.tasks.push(tokio::spawn(accept(http, move |stream| {
            serve_http(stream, received.clone(), keep)
        })));
    }

    /// A dead collector: nothing listens on its ports any more (connections are refused), and
    /// the connections it had are closed.
    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }

    /// A collector that hangs: stops serving, then listens again on both ports, accepting
    /// connections and never reading from or answering them (until [`OtlpReceiver::stop`]).
    pub fn black_hole(&mut self, netns: &Netns) {
        self.stop();
        for port in [self.grpc_port, self.http_port] {
            let listener = netns.listen(port);
            self.tasks.push(tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    held.push(stream);
                }
            }));
        }
    }

    /// Serves again (after [`OtlpReceiver::stop`] or [`OtlpReceiver::black_hole`]), keeping
    /// what it received.
    pub fn restart(&mut self, netns: &Netns) {
        self.stop();
        self.serve(netns);
    }

    /// Every span received so far, in order of arrival.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    /// Every export request received so far, as sent.
    pub fn raw_exports(&self) -> Vec<RawExport> {
        self.received.raw.lock().unwrap().clone()
    }

    /// How many spans arrived (in either mode).
    pub fn span_count(&self) -> u64 {
        self.received.span_count.load(Ordering::Relaxed)
    }

    /// How many export requests arrived (in either mode).
    pub fn request_count(&self) -> u64 {
        self.received.requests.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` until `done` holds for the spans received so far, and returns them;
    /// panics naming `what`, with what did arrive, if it never does.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the OTLP receiver never got {what} within {timeout:?}; it got:\n{}",
                describe(&spans)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One line per span (service, kind, name, ids), for failure messages.
pub fn describe(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {:?} {:?} trace {} span {} parent {:?}\n",
                s.service,
                s.span.kind(),
                s.span.name,
                s.trace_id(),
                s.span_id(),
                s.parent_span_id()
            )
        })
        .collect()
}

/// Accepts connections until aborted; each is served by `serve` on a task of a set that the
/// abort drops (closing every connection with it).
async fn accept<S, F>(listener: TcpListener, serve: S)
where
    S: Fn(tokio::net::TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream));
                }
                Err(_) => return,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One OTLP/gRPC connection (HTTP/2): each request's body is read whole, its message recorded
/// as sent, and the request handed to tonic's generated `TraceServiceServer` (which decodes it
/// again and answers with gRPC's framing and trailers).
async fn serve_grpc(stream: tokio::net::TcpStream, received: Arc<Received>, keep: Keep) {
    let server = TraceServiceServer::new(Collector);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (mut server, received) = (server.clone(), received.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            // A gRPC message: compressed flag (0: not compressed, as OTLP exporters send by
            // default), 4-byte big-endian length, the message.
            if parts.uri.path() == GRPC_EXPORT_PATH && body.len() >= 5 && body[0] == 0 {
                let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                if let Some(message) = body.get(5..5 + len) {
                    let _ = received.record(keep, Transport::Grpc, body.slice_ref(message));
                }
            }
            let request = Request::from_parts(parts, Full::new(body));
            tonic::codegen::Service::call(&mut server, request).await
        }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// One OTLP/HTTP connection (HTTP/1.1): `POST /v1/traces` with a protobuf body gets 200 and an
/// empty `ExportTraceServiceResponse`; anything else 404 or 400.
async fn serve_http(stream: tokio::net::TcpStream, received: Arc<Received>, keep: Keep) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let received = received.clone();
        async move {
            let answer = |status: StatusCode, body: Bytes| {
                Response::builder()
                    .status(status)
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(body))
                    .unwrap()
            };
            if request.method() != hyper::Method::POST
                || request.uri().path() != OTLP_HTTP_TRACES_PATH
            {
                return Ok::<_, std::convert::Infallible>(answer(
                    StatusCode::NOT_FOUND,
                    Bytes::new(),
                ));
            }
            let protobuf = request
                .headers()
                .get("content-type")
                .is_some_and(|v| v == "application/x-protobuf");
            let Ok(body) = request.into_body().collect().await.map(|b| b.to_bytes()) else {
                return Ok(answer(StatusCode::BAD_REQUEST, Bytes::new()));
            };
            if !protobuf
                || received
                    .record(keep, Transport::HttpProtobuf, body)
                    .is_err()
            {
                return Ok(answer(StatusCode::BAD_REQUEST, Bytes::new()));
            }
            Ok(answer(
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec().into(),
            ))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The Python that `scripts/test` installs PyPI's OpenTelemetry SDK, its OTLP exporter and the
/// B3 propagator into (the `python3` on PATH, as [`crate::l7::peer_python`]: pyenv's, which
/// only root can run). Panics with the install command if they are missing.
pub fn otel_python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.grpc, \
                 opentelemetry.propagators.b3, opentelemetry.proto, sys; print(sys.executable)",
            ])
            .output()
            .expect("running python3");
        assert!(
            out.status.success(),
            "the OpenTelemetry SDK is not installed (python3 -m pip install \
             opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp==1.45.2 \
             opentelemetry-propagator-b3==1.45.1): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
}
