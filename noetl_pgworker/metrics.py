"""Prometheus metrics and the health endpoints (``--metrics-port``).

The worker's parts report through a :class:`Metrics` object; :class:`NullMetrics` (the
default) does nothing, so the library costs nothing when metrics are off. Each worker keeps its
own registry (no process-global state). The HTTP server answers ``/metrics`` (Prometheus text),
``/healthz`` (the process is alive) and ``/readyz`` (database reachable, listener up, not
shutting down).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from . import threads

logger = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class NullMetrics:
    """Metrics off."""

    def claimed(
        self,
        kinds: list[str],
        *,
        reclaimed: int = 0,
        wake_latency: float | None = None,
        waits: list[float] | None = None,
    ) -> None:
        pass

    def finished(self, kind: str, ok: bool, duration: float) -> None:
        pass

    def cancelled(self, kind: str) -> None:
        pass

    def fenced(self) -> None:
        pass

    def db_error(self, component: str) -> None:
        pass

    def queue_depth(self, depth: dict[tuple[str, str], int] | None, stuck: int = 0) -> None:
        pass

    def server_batch_failed(self) -> None:
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
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self._add_process_and_build()
        self.registry.register(
            _CounterOf(
                "noetl_pgworker_listener_reconnects",
                "LISTEN connections replaced.",
                listener_reconnects,
            )
        )
        self._add_counters()
        self._add_histograms()
        self._add_gauges(
            {
                "noetl_pgworker_in_flight": ("Commands running now.", in_flight),
                "noetl_pgworker_free_slots": ("Threads free to start a command.", free_slots),
                "noetl_pgworker_pending_writes": (
                    "Commands whose state awaits its write.",
                    pending_writes,
                ),
                "noetl_pgworker_heartbeat_age_seconds": (
                    "Seconds since the last successful heartbeat.",
                    heartbeat_age,
                ),
            }
        )

    def _add_process_and_build(self) -> None:
        """process_* (CPU, memory, file descriptors, start time) and
        noetl_pgworker_build_info{version, python} = 1."""
        import platform
        from importlib.metadata import PackageNotFoundError, version

        from prometheus_client import Gauge, ProcessCollector

        try:
            release = version("noetl-pgworker")
        except PackageNotFoundError:  # (a checkout not installed)
            release = "unknown"
        ProcessCollector(registry=self.registry)
        Gauge(
            "noetl_pgworker_build_info",
            "The worker's version and Python (always 1).",
            ["version", "python"],
            registry=self.registry,
        ).labels(release, platform.python_version()).set(1)

    def _add_counters(self) -> None:
        from prometheus_client import Counter

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
        self._cancelled = Counter(
            "noetl_pgworker_commands_cancelled",
            "Commands the worker stopped and wrote CANCELLED (noetl-pgworker cancel).",
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
        self._batches_failed = Counter(
            "noetl_pgworker_server_batches_failed",
            "Event batches the NoETL server accepted (202) and then failed.",
            registry=r,
        )
        self._db_errors = Counter(
            "noetl_pgworker_database_errors",
            "Database errors by component.",
            ["component"],
            registry=r,
        )

    def _add_histograms(self) -> None:
        from prometheus_client import Histogram

        r = self.registry
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
        self._queue_wait = Histogram(
            "noetl_pgworker_queue_wait_seconds",
            "From a command's creation to its claim (claimed_at - created_at).",
            ["tool_kind"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self._batch = Histogram(
            "noetl_pgworker_claim_batch_size",
            "Commands per claim.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    def _add_gauges(self, sampled: dict[str, tuple[str, Callable[[], float]]]) -> None:
        """The sampled gauges, and one gauge per ``sampled`` name reading (doc, function)."""
        from prometheus_client import Gauge

        r = self.registry
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
        for name, (doc, fn) in sampled.items():
            Gauge(name, doc, registry=r).set_function(fn)

    def claimed(
        self,
        kinds: list[str],
        *,
        reclaimed: int = 0,
        wake_latency: float | None = None,
        waits: list[float] | None = None,
    ) -> None:
        for kind in kinds:
            self._claimed.labels(kind).inc()
        for kind, wait in zip(kinds, waits or (), strict=False):
            self._queue_wait.labels(kind).observe(wait)
        if reclaimed:
            self._reclaimed.inc(reclaimed)
        if kinds:
            self._batch.observe(len(kinds))
        if wake_latency is not None:
            self._wake.observe(wake_latency)

    def finished(self, kind: str, ok: bool, duration: float) -> None:
        (self._completed if ok else self._failed).labels(kind).inc()
        self._duration.labels(kind).observe(duration)

    def cancelled(self, kind: str) -> None:
        self._cancelled.labels(kind).inc()

    def fenced(self) -> None:
        self._fenced.inc()

    def server_batch_failed(self) -> None:
        self._batches_failed.inc()

    def db_error(self, component: str) -> None:
        self._db_errors.labels(component).inc()

    def queue_depth(self, depth: dict[tuple[str, str], int] | None, stuck: int = 0) -> None:
        """``depth`` None: another worker exports it (this one exports no series)."""
        self._stuck.set(stuck)
        self._depth.clear()
        for (status, kind), n in (depth or {}).items():
            self._depth.labels(status, kind).set(n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class _CounterOf:
    """A counter read from a function at each scrape (``<name>_total``)."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def describe(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily(self.name, self.doc)]

    def collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily(self.name, self.doc, value=self.read())]


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a fixed, small set of named threads.

    One thread accepts connections and gathers each one's request head without a thread per
    connection; ``handlers`` threads answer complete requests. A connection that has not sent
    a whole request head within ``timeout`` seconds is closed, and so is one that does not take
    its answer within ``timeout``. At most ``max_pending`` connections wait for their request
    (the oldest is closed to make room, so a flood of idle connections cannot lock out a
    probe); at most ``max_queued`` complete requests wait for a handler (more are closed at
    once). One request per connection (HTTP/1.0 semantics).
    """

    MAX_REQUEST_HEAD = 16 * 1024

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        ready: Callable[[], tuple[bool, str]],
        *,
        timeout: float = 5.0,
        handlers: int = 4,
        max_pending: int = 128,
        max_queued: int = 32,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._timeout = timeout
        self._handlers = handlers
        self._max_pending = max_pending
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self._sock = socket.create_server((host, port), family=family, backlog=128)
        self._sock.setblocking(False)
        self.port = int(self._sock.getsockname()[1])
        self._stopping = threading.Event()
        self._queue: queue.Queue[tuple[socket.socket, bytes] | None] = queue.Queue(max_queued)
        self._threads = [
            threading.Thread(target=self._serve, name="noetl-pgworker-metrics", daemon=True),
            *(
                threading.Thread(
                    target=self._answer_loop, name=f"noetl-pgworker-metrics-{i}", daemon=True
                )
                for i in range(handlers)
            ),
        ]

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        started = [t for t in self._threads if t.ident is not None]
        if started:
            threads.join(self._threads[0], 5)
            for _ in range(self._handlers):
                with contextlib.suppress(queue.Full):
                    self._queue.put(None, timeout=1)
            for thread in started[1:]:
                threads.join(thread, 5)
        self._sock.close()

    # -- the accepting thread ----------------------------------------------------------------

    def _serve(self) -> None:
        # Connections waiting for their request head, oldest first: socket -> (deadline, bytes)
        pending: dict[socket.socket, tuple[float, bytearray]] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)

            def drop(conn: socket.socket) -> None:
                del pending[conn]
                sel.unregister(conn)
                _close(conn)

            try:
                while not self._stopping.is_set():
                    now = time.monotonic()
                    while pending:
                        oldest = next(iter(pending))
                        if pending[oldest][0] > now:
                            break
                        drop(oldest)
                    wait = 0.5
                    if pending:
                        wait = min(wait, max(0.0, next(iter(pending.values()))[0] - now))
                    for key, _ in sel.select(wait):
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)
                        if conn is self._sock:
                            self._accept(sel, pending, drop)
                        elif conn in pending:
                            self._read_head(conn, sel, pending, drop)
            finally:
                for conn in list(pending):
                    drop(conn)

    def _read_head(
        self,
        conn: socket.socket,
        sel: selectors.BaseSelector,
        pending: dict[socket.socket, tuple[float, bytearray]],
        drop: Callable[[socket.socket], None],
    ) -> None:
        """Read what ``conn`` sent; a complete request head goes to the answering threads."""
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            drop(conn)
            return
        buf = pending[conn][1]
        buf += data
        if not data or len(buf) > self.MAX_REQUEST_HEAD:
            drop(conn)
        elif b"\r\n\r\n" in buf or b"\n\n" in buf:
            del pending[conn]
            sel.unregister(conn)
            try:
                self._queue.put_nowait((conn, bytes(buf)))
            except queue.Full:
                _close(conn)

    def _accept(
        self,
        sel: selectors.BaseSelector,
        pending: dict[socket.socket, tuple[float, bytearray]],
        drop: Callable[[socket.socket], None],
    ) -> None:
        for _ in range(256):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: try again on the next round
                logger.debug("metrics server: accept failed: %s", exc)
                return
            conn.setblocking(False)
            if len(pending) >= self._max_pending:
                drop(next(iter(pending)))
            pending[conn] = (time.monotonic() + self._timeout, bytearray())
            sel.register(conn, selectors.EVENT_READ)

    # -- the answering threads ---------------------------------------------------------------

    def _answer_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            conn, head = item
            try:
                conn.setblocking(True)
                conn.settimeout(self._timeout)
                conn.sendall(self._response(head))
            except OSError:
                pass
            finally:
                _close(conn)

    def _response(self, head: bytes) -> bytes:
        parts = head.split(b"\n", 1)[0].decode("latin-1").split()
        method = parts[0] if parts else ""
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            code, body, ctype = 400, b"bad request\n", "text/plain"
        elif method not in ("GET", "HEAD"):
            code, body, ctype = 405, b"method not allowed\n", "text/plain"
        else:
            code, body, ctype = self._route(parts[1].split("?")[0])
        status = HTTPStatus(code)
        lines = [
            f"HTTP/1.0 {status.value} {status.phrase}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "",
            "",
        ]
        return "\r\n".join(lines).encode("latin-1") + (b"" if method == "HEAD" else body)

    def _route(self, path: str) -> tuple[int, bytes, str]:
        try:
            if path == "/metrics":
                return 200, self._metrics.render(), "text/plain; version=0.0.4"
            if path == "/healthz":
                return 200, b"ok\n", "text/plain"
            if path == "/readyz":
                ok, why = self._ready()
                return (200 if ok else 503), (why + "\n").encode(), "text/plain"
        except Exception as exc:
            logger.warning("metrics server: %s failed: %s", path, exc)
            return 500, b"internal error\n", "text/plain"
        return 404, b"not found\n", "text/plain"


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.close()
