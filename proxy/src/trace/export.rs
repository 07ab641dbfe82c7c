//! The exporter: one task owns the span queue, batches spans and sends them over OTLP (gRPC or
//! HTTP/protobuf) one export at a time, with backoff after failures. A slow or dead collector
//! costs the data path one `try_send` per sampled span: what does not fit is dropped and counted.
//!
//! A batch is sent when it has `--trace-batch-size` spans or its first span waited
//! `--trace-batch-timeout`. While an export is in flight (at most `--trace-export-timeout`) new
//! spans wait in the queue. A failed export drops its batch (no retry queue: a span is worth
//! less than the memory and the collector's recovery), and starts a backoff (100 ms doubling to
//! 30 s) during which batches that come due are dropped without trying.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prost::Message;
use sigil_identity::SpiffeId;
use sigil_proto::opentelemetry::proto::collector::trace::v1::trace_service_client::TraceServiceClient;
use sigil_proto::opentelemetry::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use sigil_proto::opentelemetry::proto::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value,
};
use sigil_proto::opentelemetry::proto::resource::v1::Resource;
use sigil_proto::opentelemetry::proto::trace::v1 as otlp;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{debug, warn};

use super::span::{AttributeValue, SCHEMA_URL, SpanKind, SpanRecord};
use super::{Sampler, TraceConfig, Tracer};
use crate::tls::TlsState;

/// The instrumentation scope of every span.
const SCOPE_NAME: &str = "sigil-proxy";
/// Backoff after a failed export: the first delay, doubled per failure up to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An OTLP/HTTP answer is a small protobuf; more is not a collector.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the collector answered {0}")]
    Grpc(#[source] tonic::Status),
    #[error("connecting to the collector at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the collector: {0}")]
    Http(#[source] hyper::Error),
    #[error("reading the collector's answer: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the collector answered HTTP {0}")]
    Status(http::StatusCode),
    #[error("the collector's answer is not an ExportTraceServiceResponse: {0}")]
    Decode(#[source] prost::DecodeError),
    #[error("the collector URL {0} has no host")]
    NoHost(http::Uri),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// `--trace-protocol`, named as `OTEL_EXPORTER_OTLP_PROTOCOL` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportProtocol {
    #[default]
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full`, `export_failed`, `rejected` (the collector's partial success) or `shutdown`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct ExportLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// The exporter's metrics (registered by `crate::metrics::Metrics` with the `sigil_proxy_`
/// prefix): `trace_spans_exported_total`, `trace_spans_dropped_total{reason}`,
/// `trace_exports_total{result}`, `trace_export_duration_seconds`, `trace_queue_spans`.
#[derive(Debug, Clone)]
pub struct TraceMetrics {
    pub spans_exported: Counter,
    pub spans_dropped: Family<DropLabels, Counter>,
    pub exports: Family<ExportLabels, Counter>,
    pub export_duration: Histogram,
    pub queue_spans: Gauge,
}

/// `trace_export_duration_seconds`' buckets: a collector answers in milliseconds; the export
/// timeout (10 s by default) bounds the top.
const EXPORT_DURATION_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

impl Default for TraceMetrics {
    fn default() -> TraceMetrics {
        TraceMetrics {
            spans_exported: Counter::default(),
            spans_dropped: Family::default(),
            exports: Family::default(),
            export_duration: Histogram::new(EXPORT_DURATION_BUCKETS),
            queue_spans: Gauge::default(),
        }
    }
}

/// Starts the exporter task: returns the [`Tracer`] the data path holds and the task, which
/// ends once `shutdown` turns true (after flushing what is queued) or every [`Tracer`] is gone.
/// The resource's identity (`service.name` default, `sigil.proxy.identity`, namespace) is read
/// from `tls` at each export, so the task can start before the first certificate arrives.
/// The collector is dialled in plaintext (`http://`): the proxy's own traffic is not redirected
/// into the mesh.
pub fn start(
    config: &TraceConfig,
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    metrics: TraceMetrics,
    shutdown: watch::Receiver<bool>,
) -> (Tracer, JoinHandle<()>) {
    let identity = tls_identity(tls);
    start_with_identity(config, identity, metrics, shutdown)
}

/// Maps the TLS state to the proxy's SPIFFE ID (what the resource needs of it).
fn tls_identity(
    mut tls: watch::Receiver<Option<Arc<TlsState>>>,
) -> watch::Receiver<Option<SpiffeId>> {
    let (identity_tx, identity_rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            let id = tls
                .borrow_and_update()
                .as_ref()
                .map(|state| state.id.clone());
            identity_tx.send_if_modified(|current| {
                let changed = *current != id;
                *current = id;
                changed
            });
            if tls.changed().await.is_err() || identity_tx.is_closed() {
                return;
            }
        }
    });
    identity_rx
}

/// [`start`] with the proxy's SPIFFE ID as a watch (what tests give).
pub fn start_with_identity(
    config: &TraceConfig,
    identity: watch::Receiver<Option<SpiffeId>>,
    metrics: TraceMetrics,
    shutdown: watch::Receiver<bool>,
) -> (Tracer, JoinHandle<()>) {
    let (queue, spans) = mpsc::channel(config.queue_size.max(1));
    let tracer = Tracer::new(
        Sampler {
            ratio: config.sampling,
        },
        queue,
        metrics.clone(),
    );
    let exporter = Exporter {
        client: Client::new(config),
        service_name: config.service_name.clone(),
        pod_name: std::env::var("POD_NAME")
            .ok()
            .filter(|name| !name.is_empty()),
        identity,
        metrics,
        batch_size: config.batch_size.max(1),
        batch_timeout: config.batch_timeout,
        export_timeout: config.export_timeout,
        backoff: Backoff::default(),
    };
    (tracer, tokio::spawn(exporter.run(spans, shutdown)))
}

struct Exporter {
    client: Client,
    service_name: Option<String>,
    pod_name: Option<String>,
    identity: watch::Receiver<Option<SpiffeId>>,
    metrics: TraceMetrics,
    batch_size: usize,
    batch_timeout: Duration,
    export_timeout: Duration,
    backoff: Backoff,
}

impl Exporter {
    async fn run(
        mut self,
        mut spans: mpsc::Receiver<SpanRecord>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut deadline = None;
        loop {
            tokio::select! {
                biased;
                () = signalled(&mut shutdown) => break,
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    deadline = None;
                    self.flush(&mut batch).await;
                }
                span = spans.recv() => {
                    let Some(span) = span else { break };
                    self.metrics.queue_spans.dec();
                    if batch.is_empty() {
                        deadline = Some(Instant::now() + self.batch_timeout);
                    }
                    batch.push(span);
                    if batch.len() >= self.batch_size {
                        deadline = None;
                        self.flush(&mut batch).await;
                    }
                }
            }
        }
        self.drain(spans, batch).await;
    }

    /// Shutdown: what is queued goes out in full batches until an export fails (or a backoff
    /// is running); the rest is counted as dropped at `shutdown`. Later spans find the queue
    /// closed and are counted by the data path.
    async fn drain(&mut self, mut spans: mpsc::Receiver<SpanRecord>, mut batch: Vec<SpanRecord>) {
        spans.close();
        let mut exporting = !self.backoff.active();
        loop {
            while batch.len() < self.batch_size {
                let Ok(span) = spans.try_recv() else { break };
                self.metrics.queue_spans.dec();
                batch.push(span);
            }
            if batch.is_empty() {
                return;
            }
            let spans = std::mem::take(&mut batch);
            if exporting {
                exporting = self.export(spans).await;
            } else {
                self.drop_spans("shutdown", spans.len());
            }
        }
    }

    /// Sends the batch unless a backoff is running (then it is dropped).
    async fn flush(&mut self, batch: &mut Vec<SpanRecord>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(self.batch_size));
        if self.backoff.active() {
            debug!(
                spans = spans.len(),
                "trace export backing off: batch dropped"
            );
            self.drop_spans("export_failed", spans.len());
            return;
        }
        self.export(spans).await;
    }

    /// One export, bounded by the export timeout; whether it succeeded.
    async fn export(&mut self, spans: Vec<SpanRecord>) -> bool {
        let count = spans.len();
        let request = {
            let identity = self.identity.borrow();
            export_request(
                resource(
                    self.service_name.as_deref(),
                    identity.as_ref(),
                    self.pod_name.as_deref(),
                ),
                spans,
            )
        };
        let started = Instant::now();
        let result = self.client.export(request, self.export_timeout).await;
        self.metrics
            .export_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => {
                self.count_export("ok");
                self.backoff.succeeded();
                let partial = response.partial_success.unwrap_or_default();
                let rejected = usize::try_from(partial.rejected_spans.max(0))
                    .unwrap_or(usize::MAX)
                    .min(count);
                if rejected > 0 {
                    warn!(rejected, spans = count, message = %partial.error_message, "the trace collector rejected spans");
                    self.drop_spans("rejected", rejected);
                }
                self.metrics
                    .spans_exported
                    .inc_by((count - rejected) as u64);
                true
            }
            Err(error) => {
                self.count_export("error");
                let retry_in = self.backoff.failed();
                warn!(error = %error, spans = count, ?retry_in, "trace export failed: spans dropped");
                self.drop_spans("export_failed", count);
                false
            }
        }
    }

    fn count_export(&self, result: &'static str) {
        self.metrics
            .exports
            .get_or_create(&ExportLabels { result })
            .inc();
    }

    fn drop_spans(&self, reason: &'static str, count: usize) {
        self.metrics
            .spans_dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(count as u64);
    }
}

/// Resolves once `shutdown` is true; never if its sender is gone without saying so.
async fn signalled(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Exponential backoff after failed exports.
#[derive(Debug, Default)]
struct Backoff {
    delay: Option<Duration>,
    until: Option<Instant>,
}

impl Backoff {
    fn active(&self) -> bool {
        self.until.is_some_and(|until| Instant::now() < until)
    }

    /// Starts (or doubles) the backoff; returns its length.
    fn failed(&mut self) -> Duration {
        let delay = self
            .delay
            .map_or(BACKOFF_FIRST, |delay| (delay * 2).min(BACKOFF_MAX));
        self.delay = Some(delay);
        self.until = Some(Instant::now() + delay);
        delay
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// The OTLP transport.
enum Client {
    /// A lazily connected channel: tonic reconnects it after failures.
    Grpc(TraceServiceClient<Channel>),
    Http(HttpClient),
}

impl Client {
    fn new(config: &TraceConfig) -> Client {
        match config.protocol {
            ExportProtocol::Grpc => Client::Grpc(TraceServiceClient::new(
                Channel::builder(config.collector.clone())
                    .connect_timeout(config.export_timeout)
                    .connect_lazy(),
            )),
            ExportProtocol::HttpProtobuf => Client::Http(HttpClient::new(&config.collector)),
        }
    }

    async fn export(
        &mut self,
        request: ExportTraceServiceRequest,
        timeout: Duration,
    ) -> Result<ExportTraceServiceResponse, ExportError> {
        match self {
            Client::Grpc(client) => {
                let mut request = tonic::Request::new(request);
                request.set_timeout(timeout);
                match tokio::time::timeout(timeout, client.export(request)).await {
                    Ok(Ok(response)) => Ok(response.into_inner()),
                    Ok(Err(status)) => Err(ExportError::Grpc(status)),
                    Err(_) => Err(ExportError::Timeout(timeout)),
                }
            }
            Client::Http(client) => {
                let body = request.encode_to_vec();
                match tokio::time::timeout(timeout, client.post(body)).await {
                    Ok(result) => result,
                    Err(_) => {
                        // The connection may be mid-request: never reuse it.
                        client.sender = None;
                        Err(ExportError::Timeout(timeout))
                    }
                }
            }
        }
    }
}

/// OTLP/HTTP with binary protobuf: `POST {collector}/v1/traces` over one kept-alive HTTP/1.1
/// connection, re-dialled after an error.
struct HttpClient {
    collector: http::Uri,
    /// The request target (`/v1/traces` unless the URL names a path).
    path: http::uri::PathAndQuery,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    fn new(collector: &http::Uri) -> HttpClient {
        let path = match collector.path_and_query() {
            Some(path) if path.as_str() != "/" => path.clone(),
            _ => http::uri::PathAndQuery::from_static("/v1/traces"),
        };
        HttpClient {
            collector: collector.clone(),
            path,
            sender: None,
        }
    }

    async fn post(&mut self, body: Vec<u8>) -> Result<ExportTraceServiceResponse, ExportError> {
        let mut sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.connect().await?,
        };
        sender.ready().await.map_err(ExportError::Http)?;
        let authority = self
            .collector
            .authority()
            .ok_or_else(|| ExportError::NoHost(self.collector.clone()))?;
        let request = http::Request::post(self.path.as_str())
            .header(http::header::HOST, authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .expect("a path, a host and a content type make a valid request");
        let response = sender
            .send_request(request)
            .await
            .map_err(ExportError::Http)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(ExportError::Body)?
            .to_bytes();
        self.sender = Some(sender);
        if !status.is_success() {
            return Err(ExportError::Status(status));
        }
        ExportTraceServiceResponse::decode(body).map_err(ExportError::Decode)
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, ExportError> {
        let host = self
            .collector
            .host()
            .ok_or_else(|| ExportError::NoHost(self.collector.clone()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.collector.port_u16().unwrap_or(80);
        let stream =
            TcpStream::connect((host, port))
                .await
                .map_err(|source| ExportError::Connect {
                    address: format!("{host}:{port}"),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ExportError::Http)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(error = %error, "trace collector connection closed");
            }
        });
        Ok(sender)
    }
}

/// The resource every span is exported under: `service.name` (`--trace-service-name`, else
/// `{sa}.{ns}` of the proxy's SPIFFE ID, else OpenTelemetry's `unknown_service:` form),
/// `k8s.namespace.name`, `k8s.pod.name` (`POD_NAME`, set by the injector), and
/// `sigil.proxy.identity`.
pub fn resource(
    service_name: Option<&str>,
    identity: Option<&SpiffeId>,
    pod_name: Option<&str>,
) -> Resource {
    let workload = identity.and_then(SpiffeId::service_account);
    let service_name = match (service_name, workload) {
        (Some(name), _) => name.to_owned(),
        (None, Some((namespace, service_account))) => format!("{service_account}.{namespace}"),
        (None, None) => format!("unknown_service:{SCOPE_NAME}"),
    };
    let mut attributes = vec![string_attribute("service.name", service_name)];
    if let Some((namespace, _)) = workload {
        attributes.push(string_attribute("k8s.namespace.name", namespace.to_owned()));
    }
    if let Some(pod_name) = pod_name {
        attributes.push(string_attribute("k8s.pod.name", pod_name.to_owned()));
    }
    if let Some(identity) = identity {
        attributes.push(string_attribute(
            "sigil.proxy.identity",
            identity.to_string(),
        ));
    }
    Resource {
        attributes,
        ..Resource::default()
    }
}

/// One export request: the resource, the `sigil-proxy` scope, the spans.
pub fn export_request(resource: Resource, spans: Vec<SpanRecord>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..InstrumentationScope::default()
                }),
                spans: spans.into_iter().map(otlp_span).collect(),
                schema_url: SCHEMA_URL.to_owned(),
            }],
            schema_url: SCHEMA_URL.to_owned(),
        }],
    }
}

/// A span in OTLP: times in Unix nanoseconds; `flags` carry the W3C flags (sampled: every
/// exported span is) and whether the parent is remote (it always is: it came in a header).
pub fn otlp_span(record: SpanRecord) -> otlp::Span {
    let mut flags = 0x01 | otlp::SpanFlags::ContextHasIsRemoteMask as u32;
    if record.parent.is_some() {
        flags |= otlp::SpanFlags::ContextIsRemoteMask as u32;
    }
    let kind = match record.kind {
        SpanKind::Server => otlp::span::SpanKind::Server,
        SpanKind::Client => otlp::span::SpanKind::Client,
    };
    let code = if record.error {
        otlp::status::StatusCode::Error
    } else {
        otlp::status::StatusCode::Unset
    };
    otlp::Span {
        trace_id: record.trace_id.0.to_vec(),
        span_id: record.span_id.0.to_vec(),
        parent_span_id: record
            .parent
            .map(|parent| parent.0.to_vec())
            .unwrap_or_default(),
        flags,
        name: record.name,
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(record.start),
        end_time_unix_nano: unix_nanos(record.end),
        attributes: record
            .attributes
            .into_iter()
            .map(|(key, value)| KeyValue {
                key: key.to_owned(),
                value: Some(any_value(value)),
                ..KeyValue::default()
            })
            .collect(),
        status: Some(otlp::Status {
            code: code as i32,
            message: String::new(),
        }),
        ..otlp::Span::default()
    }
}

fn any_value(value: AttributeValue) -> AnyValue {
    AnyValue {
        value: Some(match value {
            AttributeValue::Str(value) => any_value::Value::StringValue(value),
            AttributeValue::Int(value) => any_value::Value::IntValue(value),
        }),
    }
}

fn string_attribute(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(any_value(AttributeValue::Str(value))),
        ..KeyValue::default()
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

#[cfg(test)]
mod tests;
