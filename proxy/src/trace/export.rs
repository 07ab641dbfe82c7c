//! The exporter: one task owns the span queue, batches spans and sends them over OTLP (gRPC or
//! HTTP/protobuf) one export at a time, with backoff after failures. A slow or dead collector
//! costs the data path one `try_send` per sampled span: what does not fit is dropped and counted.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

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
