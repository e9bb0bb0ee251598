"""Traces of commands over OpenTelemetry: optional (``pip install 'noetl-pgworker[otel]'``),
off unless configured, nothing done per command when off.

On when ``--otlp-endpoint`` (``NOETL_PGWORKER_OTLP_ENDPOINT``) is given, or when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (and
``OTEL_SDK_DISABLED`` is not ``true``, ``OTEL_TRACES_EXPORTER`` not ``none``). Spans go over
OTLP/HTTP in batches; the other ``OTEL_*`` variables (headers, timeout, service name, resource
attributes, sampler) work as the SDK reads them.

Each command written (or given up) is one span, ``command <step>``, from its row's creation to
its outcome's write, with ``noetl.execution_id``, ``noetl.command_id``, ``noetl.step``,
``noetl.tool_kind``, ``noetl.attempt``, ``noetl.worker_id`` and ``noetl.outcome``; its children
are ``claim wait`` (created → claimed by this worker), ``run <kind>`` (the tool) and ``write``
(the tool done → its outcome committed). All the commands of one execution share one trace,
whichever worker ran them: its id is derived from the execution id (:func:`execution_trace_id`).
The spans are made when the outcome is written, from times taken on the way, so nothing of
OpenTelemetry runs on the claim or tool threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RetryLater
from .redact import redact_secrets

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from .models import Command, CommandRef, Outcome
    from .sink import Sink, WriteItem

logger = logging.getLogger(__name__)

#: Claimed commands remembered for their span at most (the oldest are forgotten first).
MAX_OPEN = 100_000
#: An error message in a span is cut to this many characters.
MAX_ERROR = 512
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

Key = tuple[int, int]


def execution_trace_id(execution_id: int) -> int:
    """The trace id of an execution's commands: the first 16 bytes of BLAKE2b of its id."""
    digest = hashlib.blake2b(str(execution_id).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "big") or 1


def wanted(endpoint: str | None, env: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is configured (the option, or the standard variables)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(endpoint) or any(env.get(name) for name in _ENDPOINT_VARS)


def from_settings(
    worker_id: str, endpoint: str | None, env: Mapping[str, str] = os.environ
) -> CommandTraces | None:
    """The worker's tracing, or None when it is not configured (the default)."""
    if not wanted(endpoint, env):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            "tracing is configured (--otlp-endpoint or OTEL_EXPORTER_OTLP_*ENDPOINT) but"
            " OpenTelemetry is not installed: pip install 'noetl-pgworker[otel]'"
        ) from exc
    traces_url = endpoint.rstrip("/") + "/v1/traces" if endpoint else None
    provider = make_provider(worker_id)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))
    return CommandTraces(provider, worker_id)


def make_provider(worker_id: str) -> TracerProvider:
    """A tracer provider of the worker's own (the process's global one is left alone)."""
    from importlib.metadata import version

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or "noetl-pgworker",
            "service.version": version("noetl-pgworker"),
            "service.instance.id": worker_id,
        }
    )
    # shutdown_on_exit=False: the worker closes it, bounded (close); an exit handler would wait
    # for an unreachable collector.
    return TracerProvider(resource=resource, id_generator=_execution_ids(), shutdown_on_exit=False)


def _execution_ids() -> Any:
    """An id generator: span ids at random; a root span's trace id, when its ``local`` names
    one, from the execution being traced. (Made here: OpenTelemetry is imported only when
    tracing is on.)"""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class ExecutionIds(RandomIdGenerator):
        def __init__(self) -> None:
            self.local = threading.local()

        def generate_trace_id(self) -> int:
            trace_id: int = getattr(self.local, "trace_id", 0)
            return trace_id or super().generate_trace_id()

    return ExecutionIds()


@dataclass(slots=True)
class _Open:
    """What is known of a claimed command until its span is made."""

    step: str
    tool_kind: str
    attempt: int
    created_ns: int
    claimed_ns: int


class CommandTraces:
    """Times taken per command on its way, and its spans once its outcome is written."""

    def __init__(self, provider: TracerProvider, worker_id: str) -> None:
        ids = provider.id_generator
        #: the provider's generator, when it takes trace ids from executions (make_provider)
        self._ids: Any = ids if hasattr(ids, "local") else None
        self._provider = provider
        self._tracer: Tracer = provider.get_tracer("noetl_pgworker")
        self._worker_id = worker_id
        self._open: OrderedDict[Key, _Open] = OrderedDict()
        self._lock = threading.Lock()

    def claimed(self, command: Command, created_at: datetime | None = None) -> None:
        """``command`` was claimed now; its row was created at ``created_at``."""
        now = time.time_ns()
        created = int(created_at.timestamp() * 1e9) if created_at is not None else now
        key = (command.execution_id, int(command.command_id))
        with self._lock:
            self._open[key] = _Open(
                command.step, command.tool_kind, command.attempt, min(created, now), now
            )
            while len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)

    def written(self, ref: CommandRef, outcome: Outcome) -> None:
        """``ref``'s outcome was committed now: its spans. An outcome that is not a success
        ends its command as the sink wrote it (``sink.ENDED_BY``): a stop's interruption put it
        back to PENDING (``stopped``), a cancel made it CANCELLED, anything else FAILED."""
        result = "COMPLETED" if outcome.ok else _NOT_OK.get(outcome.error_type or "", "FAILED")
        self._emit(ref, outcome, result, time.time_ns())

    def given_up(self, ref: CommandRef, why: str, outcome: Outcome | None = None) -> None:
        """``ref`` ends here for this worker without its outcome written: ``why`` (``fenced``:
        the claim was lost; ``released``: back to PENDING; ``unwritten``: left at a stop)."""
        self._emit(ref, outcome, why, time.time_ns())

    def close(self, timeout: float = 2.0) -> None:
        """At the worker's stop: a span for each command claimed whose outcome this worker did
        not write (``stopped``: put back to PENDING, or left to recovery); then export what is
        buffered, for ``timeout`` seconds at most (a collector that does not answer does not
        hold the stop up: what it did not take is dropped)."""
        with self._lock:
            left = list(self._open)
        for execution_id, command_id in left:
            self._emit_key((execution_id, command_id), None, None, "stopped", time.time_ns())
        closer = threading.Thread(
            target=self._provider.shutdown, name="noetl-pgworker-traces-close", daemon=True
        )
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            logger.warning(
                "traces not exported within %.0f s of the stop; the rest are dropped",
                timeout,
                extra={"action": "traces_dropped"},
            )

    def _emit(self, ref: CommandRef, outcome: Outcome | None, result: str, now: int) -> None:
        self._emit_key((ref.execution_id, ref.command_id), ref, outcome, result, now)

    def _emit_key(
        self, key: Key, ref: CommandRef | None, outcome: Outcome | None, result: str, now: int
    ) -> None:
        with self._lock:
            seen = self._open.pop(key, None)
        if seen is None:
            return  # not claimed by this process (a spooled outcome), or forgotten
        attributes: dict[str, Any] = {
            "noetl.execution_id": str(key[0]),
            "noetl.command_id": str(key[1]),
            "noetl.step": seen.step,
            "noetl.tool_kind": seen.tool_kind,
            "noetl.attempt": seen.attempt,
            "noetl.worker_id": self._worker_id,
            "noetl.outcome": result,
        }
        root = self._root(key[0], seen.step, attributes, seen.created_ns)
        self._children(root, seen, outcome, seen.tool_kind, now)
        if outcome is not None and not outcome.ok and result != "stopped":
            self._fail(root, outcome)
        root.end(end_time=now)

    def _root(self, execution_id: int, step: str, attributes: dict[str, Any], start: int) -> Span:
        from opentelemetry.trace import SpanKind

        if self._ids is not None:
            self._ids.local.trace_id = execution_trace_id(execution_id)
        try:
            # CONSUMER: the command was queued by another party (NoETL's server) and taken here.
            return self._tracer.start_span(
                f"command {step}", kind=SpanKind.CONSUMER, attributes=attributes, start_time=start
            )
        finally:
            if self._ids is not None:
                self._ids.local.trace_id = 0

    def _children(
        self, root: Span, seen: _Open, outcome: Outcome | None, kind: str, now: int
    ) -> None:
        from opentelemetry import trace

        context = trace.set_span_in_context(root)
        self._tracer.start_span("claim wait", context=context, start_time=seen.created_ns).end(
            end_time=seen.claimed_ns
        )
        if outcome is None or outcome.started_at is None:
            return
        started = max(seen.claimed_ns, int(outcome.started_at.timestamp() * 1e9))
        ended = min(now, started + int(outcome.duration * 1e9))
        run = self._tracer.start_span(f"run {kind}", context=context, start_time=started)
        if not outcome.ok:
            self._fail(run, outcome)
        run.end(end_time=ended)
        self._tracer.start_span("write", context=context, start_time=ended).end(end_time=now)

    @staticmethod
    def _fail(span: Span, outcome: Outcome) -> None:
        from opentelemetry.trace import Status, StatusCode

        message = redact_secrets(outcome.error or "failed")[:MAX_ERROR]
        span.set_status(Status(StatusCode.ERROR, message))
        if outcome.error_type:
            span.set_attribute("error.type", outcome.error_type)


#: A written outcome that is not a success, by its error_type: what it made of its command.
_NOT_OK = {"interrupted": "stopped", "cancelled": "CANCELLED"}


class TracedSink:
    """A sink that makes the spans of each command whose outcome it wrote (or whose write the
    fence refused): what the worker writes through when tracing is on."""

    def __init__(self, sink: Sink, traces: CommandTraces) -> None:
        self._sink = sink
        self._traces = traces

    def write(self, items: list[WriteItem]) -> set[Key]:
        try:
            written = self._sink.write(items)
        except RetryLater as exc:
            self._spans([i for i in items if i.key in exc.written], exc.written)
            raise
        self._spans(items, written)
        return written

    def _spans(self, items: list[WriteItem], written: set[Key]) -> None:
        for item in items:
            if item.outcome is None:
                continue  # a start alone
            if item.key in written:
                self._traces.written(item.ref, item.outcome)
            else:
                self._traces.given_up(item.ref, "fenced", item.outcome)
