"""Two small services instrumented with PyPI's OpenTelemetry SDK, for tests/e2e/proxy_tracing.rs.

    tracing_app.py server SERVICE_NAME PORT COLLECTOR
        An HTTP server on 0.0.0.0:PORT. Each GET continues the trace its headers carry (the
        propagators of OTEL_PROPAGATORS, default W3C tracecontext) in a SERVER span, and answers
        JSON: the trace headers it received, its span's ids, whether it was sampled. Prints
        "serving" once it listens.

    tracing_app.py client SERVICE_NAME URL COLLECTOR
        One GET of URL inside a CLIENT span whose context is injected into the request's
        headers (W3C traceparent); prints JSON: its span's ids, the status and the server's
        answer.

    tracing_app.py decode FILE
        Decodes FILE, one OTLP ExportTraceServiceRequest as an exporter sent it, with the
        protobuf classes of PyPI's opentelemetry-proto (not sigil's generated types) and prints
        its spans as JSON: service.name, ids in hex, name, kind and attributes as text.

The server and the client export their spans to COLLECTOR with the SDK's OTLP exporter (gRPC
to http://host:4317, HTTP/protobuf to a URL ending in /v1/traces), one export per span
(SimpleSpanProcessor), under a resource whose service.name is SERVICE_NAME. No instrumentation
package: the spans, extract() and inject() are the SDK's own.
"""

import json
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as OTLPHttpSpanExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

TRACE_HEADERS = ("traceparent", "tracestate", "b3")


def tracer_provider(service_name, collector):
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if collector.endswith("/v1/traces"):
        exporter = OTLPHttpSpanExporter(endpoint=collector)
    else:
        exporter = OTLPSpanExporter(endpoint=collector, insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def ids(span):
    context = span.get_span_context()
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "sampled": context.trace_flags.sampled,
    }


def serve(service_name, port, collector):
    provider = tracer_provider(service_name, collector)
    tracer = provider.get_tracer("tracing_app.server")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            carrier = {name.lower(): value for name, value in self.headers.items()}
            context = propagate.extract(carrier)
            parent = trace.get_current_span(context).get_span_context()
            with tracer.start_as_current_span(
                "GET " + self.path, context=context, kind=SpanKind.SERVER
            ) as span:
                answer = ids(span)
                answer["parent_span_id"] = (
                    format(parent.span_id, "016x") if parent.is_valid else None
                )
                answer["headers"] = {
                    name: value
                    for name, value in carrier.items()
                    if name in TRACE_HEADERS or name.startswith("x-b3-")
                }
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("serving", flush=True)
    server.serve_forever()


def call(service_name, url, collector):
    provider = tracer_provider(service_name, collector)
    tracer = provider.get_tracer("tracing_app.client")
    with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
        headers = {}
        propagate.inject(headers)
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            answer = ids(span)
            answer["status"] = response.status
            answer["server"] = json.loads(response.read())
    provider.shutdown()
    print(json.dumps(answer), flush=True)


def decode(path):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    def text(any_value):
        kind = any_value.WhichOneof("value")
        value = getattr(any_value, kind) if kind else None
        return str(value).lower() if isinstance(value, bool) else str(value)

    with open(path, "rb") as f:
        request = ExportTraceServiceRequest.FromString(f.read())
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: text(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "service": resource.get("service.name", ""),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "attributes": {a.key: text(a.value) for a in span.attributes},
                    }
                )
    print(json.dumps(spans))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "decode":
        decode(sys.argv[2])
        sys.exit(0)
    service_name = sys.argv[2]
    if mode == "server":
        serve(service_name, int(sys.argv[3]), sys.argv[4])
    else:
        call(service_name, sys.argv[3], sys.argv[4])
