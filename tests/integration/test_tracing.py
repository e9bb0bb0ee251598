"""Command traces from a real worker on a real database (OpenTelemetry's in-memory exporter):
a three-step execution in direct mode is one trace of three command spans, each with its claim
wait, run and write; a lost claim and a stop say so; tracing off costs nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from noetl_pgworker import tracing
from noetl_pgworker.enqueue import enqueue

from ..conftest import RunningWorker
from ..helpers import all_terminal, scalar, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


def traces_for(worker_id: str, exporter: InMemorySpanExporter) -> tracing.CommandTraces:
    provider = tracing.make_provider(worker_id)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracing.CommandTraces(provider, worker_id)


def describe(spans: tuple[ReadableSpan, ...]) -> str:
    """The spans as an indented timeline (for the test's output and its failures)."""
    roots = sorted((s for s in spans if s.parent is None), key=lambda s: s.start_time or 0)
    t0 = min((s.start_time or 0) for s in spans)
    lines = []
    for root in roots:
        assert root.context is not None
        attrs = dict(root.attributes or {})
        lines.append(
            f"trace {root.context.trace_id:032x} {root.name}"
            f" [{((root.start_time or 0) - t0) / 1e6:.1f} ms + "
            f"{((root.end_time or 0) - (root.start_time or 0)) / 1e6:.1f} ms] {attrs}"
        )
        children = [
            s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id
        ]
        for child in sorted(children, key=lambda s: s.start_time or 0):
            lines.append(
                f"    {child.name} [{((child.start_time or 0) - t0) / 1e6:.1f} ms +"
                f" {((child.end_time or 0) - (child.start_time or 0)) / 1e6:.1f} ms]"
                f" {child.status.status_code.name}"
            )
    return "\n".join(lines)


def test_a_three_step_execution_is_one_trace(
    dsn: str, start_worker: Callable[..., RunningWorker], exporter: InMemorySpanExporter
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        execution = enqueue(
            conn,
            tool_kind="python",
            step="extract",
            tool_config={"code": "def main():\n    return [1, 2, 3]\n"},
        ).execution_ids[0]
        enqueue(conn, tool_kind="noop", step="transform", execution_id=execution)
        enqueue(
            conn,
            tool_kind="python",
            step="load",
            tool_config={"code": "def main():\n    raise ValueError('target is full')\n"},
            execution_id=execution,
        )
        running = start_worker(
            drain=True, worker_id="w-traced", traces=traces_for("w-traced", exporter)
        )
        running.join(60)
        assert all_terminal(conn)
    spans = exporter.get_finished_spans()
    print("\n" + describe(spans))
    roots = {s.name: s for s in spans if s.parent is None}
    assert set(roots) == {"command extract", "command transform", "command load"}
    trace_ids = {s.context.trace_id for s in roots.values() if s.context is not None}
    assert trace_ids == {tracing.execution_trace_id(execution)}
    for step, kind, outcome in (
        ("extract", "python", "COMPLETED"),
        ("transform", "noop", "COMPLETED"),
        ("load", "python", "FAILED"),
    ):
        root = roots[f"command {step}"]
        attrs = dict(root.attributes or {})
        assert attrs["noetl.execution_id"] == str(execution)
        assert attrs["noetl.step"] == step and attrs["noetl.tool_kind"] == kind
        assert attrs["noetl.worker_id"] == "w-traced" and attrs["noetl.attempt"] == 1
        assert attrs["noetl.outcome"] == outcome
        assert root.context is not None
        children = {
            s.name: s
            for s in spans
            if s.parent is not None and s.parent.span_id == root.context.span_id
        }
        assert set(children) == {"claim wait", f"run {kind}", "write"}, describe(spans)
        for child in children.values():
            assert root.start_time <= child.start_time <= child.end_time <= root.end_time  # type: ignore[operator]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for root in roots.values():
            status = scalar(
                conn,
                "SELECT status FROM noetl.command WHERE command_id = %s",
                (int(str((root.attributes or {})["noetl.command_id"])),),
            )
            assert status == (root.attributes or {})["noetl.outcome"]
    load = roots["command load"]
    assert load.status.status_code is StatusCode.ERROR
    assert "target is full" in (load.status.description or "")


def test_a_stop_with_a_command_running_and_one_claimed_says_stopped(
    dsn: str, start_worker: Callable[..., RunningWorker], exporter: InMemorySpanExporter
) -> None:
    sleeper = "import time\ndef main():\n    time.sleep(30)\n"
    with psycopg.connect(dsn, autocommit=True) as conn:
        running = start_worker(
            worker_id="w-stop", concurrency=1, shutdown_timeout=0.5,
            traces=traces_for("w-stop", exporter),
        )  # fmt: skip
        enqueue(conn, tool_kind="python", step="long", tool_config={"code": sleeper})
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM noetl.command"
                                  " WHERE status = 'RUNNING'") == 1, timeout=60)  # fmt: skip
        running.stop(60)
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert [(s.name, (s.attributes or {})["noetl.outcome"]) for s in roots] == [
        ("command long", "stopped")
    ]


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from noetl_pgworker.config import Settings\n"
        "from noetl_pgworker.worker import Worker\n"
        "worker = Worker(Settings(tool_kinds='noop'))\n"
        "assert worker.traces is None\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
