//! The exporter: one task owns the span queue, batches spans and sends them over OTLP (gRPC or
//! HTTP/protobuf) one export at a time, with backoff after failures. A slow or dead collector
//! costs the data path one `try_send` per sampled span: what does not fit is dropped and counted.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{TraceConfig, Tracer};
use crate::tls::TlsState;

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
pub fn start(
    config: &TraceConfig,
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    metrics: TraceMetrics,
    shutdown: watch::Receiver<bool>,
) -> (Tracer, JoinHandle<()>) {
    let _ = (config, tls, metrics, shutdown);
    unimplemented!("trace-core")
}
