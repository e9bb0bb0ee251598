"""The real CLI sends its command traces over OTLP/HTTP when told to, by the standard
OTEL_EXPORTER_OTLP_ENDPOINT or by --otlp-endpoint: a collector (a small HTTP server decoding
OpenTelemetry's protobuf) receives them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from noetl_pgworker.enqueue import enqueue

pytestmark = pytest.mark.acceptance


class Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[ExportTraceServiceRequest] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) of every span received."""
        found = []
        for request in self.requests:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for scope in rs.scope_spans:
                    found += [(resource, span) for span in scope.spans]
        return found


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.server.requests.append(request)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, name="test-collector", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.parametrize("how", ["env", "option"])
def test_the_cli_exports_command_spans_over_otlp(dsn: str, collector: Collector, how: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        enqueued = enqueue(conn, tool_kind="noop", step="ping", count=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_SERVICE_NAME"] = "pgworker-under-test"
    args = [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn, "--drain"]
    args += ["--worker-id", "w-otlp"]
    if how == "env":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.url
    else:
        args += ["--otlp-endpoint", collector.url]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    spans = collector.spans()
    roots = [(r, s) for r, s in spans if not s.parent_span_id]
    assert sorted(s.name for _, s in roots) == ["command ping", "command ping"]
    assert len(spans) == 2 * 4  # each: itself, claim wait, run noop, write
    for resource, span in roots:
        assert resource["service.name"] == "pgworker-under-test"
        assert resource["service.instance.id"] == "w-otlp"
        attrs = {a.key: a.value for a in span.attributes}
        assert attrs["noetl.outcome"].string_value == "COMPLETED"
        assert int(attrs["noetl.command_id"].string_value) in enqueued.command_ids
        assert attrs["noetl.worker_id"].string_value == "w-otlp"
