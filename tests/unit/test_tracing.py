"""Command traces (noetl_pgworker.tracing) with OpenTelemetry's in-memory exporter: the spans,
their attributes and times, one trace per execution, and off unless configured."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from noetl_pgworker import tracing
from noetl_pgworker.errors import ConfigError
from noetl_pgworker.models import Command, Outcome

pytestmark = pytest.mark.unit


Traced = tuple[tracing.CommandTraces, InMemorySpanExporter]


@pytest.fixture
def traced() -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = tracing.make_provider("w-1")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces = tracing.CommandTraces(provider, "w-1")
    yield traces, exporter
    traces.close()


def command(execution_id: int, command_id: int, step: str, attempt: int = 1) -> Command:
    return Command(
        command_id=str(command_id),
        execution_id=execution_id,
        step=step,
        tool_kind="python",
        catalog_id=1,
        attempt=attempt,
    )


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def test_a_written_command_is_one_span_with_claim_wait_run_and_write(traced: Traced) -> None:
    traces, exporter = traced
    created = datetime.now(UTC) - timedelta(seconds=2)
    cmd = command(7, 70, "transform", attempt=2)
    traces.claimed(cmd, created)
    started = datetime.now(UTC)
    outcome = Outcome.success({"x": 1}, duration=0.001, started_at=started)
    traces.written(cmd.ref, outcome)
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"command transform", "claim wait", "run python", "write"}
    root = spans["command transform"]
    assert root.parent is None
    assert root.kind is SpanKind.CONSUMER
    assert dict(root.attributes or {}) == {
        "noetl.execution_id": "7",
        "noetl.command_id": "70",
        "noetl.step": "transform",
        "noetl.tool_kind": "python",
        "noetl.attempt": 2,
        "noetl.worker_id": "w-1",
        "noetl.outcome": "COMPLETED",
    }
    assert root.resource.attributes["service.name"] == "noetl-pgworker"
    assert root.resource.attributes["service.instance.id"] == "w-1"
    assert root.context is not None
    assert root.context.trace_id == tracing.execution_trace_id(7)
    for name in ("claim wait", "run python", "write"):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.context is not None and child.context.trace_id == root.context.trace_id
        assert child.start_time is not None and child.end_time is not None
        assert root.start_time is not None and root.end_time is not None
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time, name
    # the claim wait starts at the row's creation
    assert root.start_time == spans["claim wait"].start_time == int(created.timestamp() * 1e9)
    assert spans["claim wait"].end_time <= spans["run python"].start_time
    assert spans["run python"].end_time == spans["write"].start_time


def test_commands_of_one_execution_share_a_trace_and_others_do_not(traced: Traced) -> None:
    traces, exporter = traced
    for execution_id, command_id in ((1, 10), (1, 11), (2, 20)):
        cmd = command(execution_id, command_id, f"s{command_id}")
        traces.claimed(cmd, None)
        traces.written(cmd.ref, Outcome.success(1, started_at=datetime.now(UTC)))
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    trace_ids = {s.attributes["noetl.command_id"]: s.context.trace_id for s in roots}
    assert trace_ids["10"] == trace_ids["11"] != trace_ids["20"]
    span_ids = {s.context.span_id for s in roots}
    assert len(span_ids) == 3


def test_a_failure_is_an_error_status_with_the_password_removed(traced: Traced) -> None:
    traces, exporter = traced
    cmd = command(3, 30, "load")
    traces.claimed(cmd, None)
    outcome = Outcome.failure(
        "cannot connect to postgresql://u:hunter2@db/x",
        error_type="exception",
        started_at=datetime.now(UTC),
    )
    traces.written(cmd.ref, outcome)
    spans = by_name(exporter.get_finished_spans())
    for name in ("command load", "run python"):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert "hunter2" not in (spans[name].status.description or "")
        assert spans[name].attributes["error.type"] == "exception"
    assert spans["command load"].attributes["noetl.outcome"] == "FAILED"


def test_given_up_commands_say_why_and_unknown_ones_make_no_span(traced: Traced) -> None:
    traces, exporter = traced
    cmd = command(4, 40, "s")
    traces.claimed(cmd, None)
    traces.given_up(cmd.ref, "released")
    traces.given_up(cmd.ref, "released")  # once only
    traces.written(command(5, 50, "t").ref, Outcome.success(1))  # never claimed here
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["claim wait", "command s"]
    assert spans[1].attributes["noetl.outcome"] == "released"


def test_off_unless_configured() -> None:
    assert tracing.from_settings("w", None, env={}) is None
    assert not tracing.wanted(None, {"OTEL_SERVICE_NAME": "x"})
    assert tracing.wanted("http://collector:4318", {})
    assert tracing.wanted(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert tracing.wanted(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    assert not tracing.wanted(None, {**off, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted(None, {**off, "OTEL_TRACES_EXPORTER": "none"})
    traces = tracing.from_settings("w", "http://127.0.0.1:9/", env={})
    assert traces is not None
    traces.close()


def test_without_the_extra_a_configured_worker_says_what_to_install() -> None:
    # OpenTelemetry hidden from a fresh interpreter: what a plain `pip install` has.
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from noetl_pgworker import tracing\n"
        "assert tracing.from_settings('w', None, env={}) is None\n"
        "tracing.from_settings('w', 'http://c:4318', env={})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert proc.returncode == 1
    assert "pip install 'noetl-pgworker[otel]'" in proc.stderr
    assert ConfigError.__name__ in proc.stderr
