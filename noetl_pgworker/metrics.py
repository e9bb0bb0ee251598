"""Prometheus metrics and the health endpoints (``--metrics-port``).

The worker's parts report through a :class:`Metrics` object; :class:`NullMetrics` (the
default) does nothing, so the library costs nothing when metrics are off. Each worker keeps its
own registry (no process-global state). The HTTP server answers ``/metrics`` (Prometheus text),
``/healthz`` (the process is alive) and ``/readyz`` (database reachable, listener up, not
shutting down).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class NullMetrics:
    """Metrics off."""

    def claimed(
        self, kinds: list[str], *, reclaimed: int = 0, wake_latency: float | None = None
    ) -> None:
        pass

    def finished(self, kind: str, ok: bool, duration: float) -> None:
        pass

    def fenced(self) -> None:
        pass

    def db_error(self, component: str) -> None:
        pass

    def queue_depth(self, depth: dict[tuple[str, str], int], stuck: int = 0) -> None:
        pass


class Metrics(NullMetrics):
    """Metrics on: a registry of this worker's counters, histograms and gauges."""

    def __init__(
        self,
        *,
        in_flight: Callable[[], int],
        free_slots: Callable[[], int],
        pending_writes: Callable[[], int],
        listener_reconnects: Callable[[], int],
        heartbeat_age: Callable[[], float],
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._claimed = Counter(
            "noetl_pgworker_commands_claimed", "Commands claimed.", ["tool_kind"], registry=r
        )
        self._completed = Counter(
            "noetl_pgworker_commands_completed",
            "Commands that ended COMPLETED.",
            ["tool_kind"],
            registry=r,
        )
        self._failed = Counter(
            "noetl_pgworker_commands_failed",
            "Commands that ended FAILED.",
            ["tool_kind"],
            registry=r,
        )
        self._reclaimed = Counter(
            "noetl_pgworker_commands_reclaimed",
            "Commands taken back from dead workers.",
            registry=r,
        )
        self._fenced = Counter(
            "noetl_pgworker_writes_fenced",
            "Writes refused because the claim was lost.",
            registry=r,
        )
        self._duration = Histogram(
            "noetl_pgworker_command_duration_seconds",
            "Time a tool ran.",
            ["tool_kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._wake = Histogram(
            "noetl_pgworker_wake_to_claim_seconds",
            "From a NOTIFY to the claim it caused.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._batch = Histogram(
            "noetl_pgworker_claim_batch_size",
            "Commands per claim.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self._db_errors = Counter(
            "noetl_pgworker_database_errors",
            "Database errors by component.",
            ["component"],
            registry=r,
        )
        self._depth = Gauge(
            "noetl_pgworker_queue_depth",
            "Commands by status and tool kind (sampled).",
            ["status", "tool_kind"],
            registry=r,
        )
        self._stuck = Gauge(
            "noetl_pgworker_stuck_claims",
            "Claims (any worker's) older than the lease (sampled).",
            registry=r,
        )
        for name, doc, fn in (
            ("noetl_pgworker_in_flight", "Commands running now.", in_flight),
            ("noetl_pgworker_free_slots", "Threads free to start a command.", free_slots),
            (
                "noetl_pgworker_pending_writes",
                "Commands whose state awaits its write.",
                pending_writes,
            ),
            (
                "noetl_pgworker_listener_reconnects",
                "LISTEN connections replaced.",
                listener_reconnects,
            ),
            (
                "noetl_pgworker_heartbeat_age_seconds",
                "Seconds since the last successful heartbeat.",
                heartbeat_age,
            ),
        ):
            Gauge(name, doc, registry=r).set_function(fn)

    def claimed(
        self, kinds: list[str], *, reclaimed: int = 0, wake_latency: float | None = None
    ) -> None:
        for kind in kinds:
            self._claimed.labels(kind).inc()
        if reclaimed:
            self._reclaimed.inc(reclaimed)
        if kinds:
            self._batch.observe(len(kinds))
        if wake_latency is not None:
            self._wake.observe(wake_latency)

    def finished(self, kind: str, ok: bool, duration: float) -> None:
        (self._completed if ok else self._failed).labels(kind).inc()
        self._duration.labels(kind).observe(duration)

    def fenced(self) -> None:
        self._fenced.inc()

    def db_error(self, component: str) -> None:
        self._db_errors.labels(component).inc()

    def queue_depth(self, depth: dict[tuple[str, str], int], stuck: int = 0) -> None:
        self._stuck.set(stuck)
        self._depth.clear()
        for (status, kind), n in depth.items():
            self._depth.labels(status, kind).set(n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a named thread."""

    def __init__(
        self, host: str, port: int, metrics: Metrics, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # scrapes are not log lines
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    owner._send(self, 200, metrics.render(), "text/plain; version=0.0.4")
                elif path == "/healthz":
                    owner._send(self, 200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ok, why = ready()
                    owner._send(self, 200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    owner._send(self, 404, b"not found\n", "text/plain")

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="noetl-pgworker-metrics", daemon=True
        )

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
