"""The worker's lifecycle: build the parts, start them, run the claim loop, shut down, summarise.

Order at start: connection pool → schema check → claim session → runtime row → reporter →
heartbeat → listener → claim loop. Order at stop: stop claiming → put unstarted claims back to
PENDING → let running commands finish (bounded) → flush outcomes → stop listener and heartbeat
→ runtime offline. Signals are the CLI's business: it calls :meth:`Worker.stop` (graceful).

What the worker holds (threads, claims) is counted in ``inflight.py``; its connections are
opened in ``connections.py``. With an injected source *and* sink (``Worker(settings,
source=…, sink=…)``) the worker needs no database at all: that is how the unit tests drive it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from . import threads, tracing
from .batches import BatchChecker
from .config import Settings
from .connections import open_pool
from .credentials import CredentialProvider, EnvCredentials
from .db import worker_session_kwargs, wrap_errors
from .dispatcher import Dispatcher
from .errors import ConfigError, PgWorkerError
from .incarnation import application_name, new_token
from .inflight import InFlight
from .interrupt import Interrupts
from .listener import Listener
from .metrics import HealthServer, Metrics, NullMetrics
from .models import Command, CommandRef, Outcome
from .redact import redact_dsn, redact_text
from .reporter import Reporter
from .runtime import Heartbeat
from .sdnotify import Notifier
from .server import CommandHeartbeats, HttpSink, NoetlServer, resolver
from .server_credentials import ServerCredentials
from .session import ClaimSession, open_session, session_mode
from .sink import PgSink, Sink
from .source import ClaimOptions, CommandSource, PgCommandSource, SourceFactory, SourceHooks
from .spool import Spool
from .tools import Confinement, ToolRegistry, default_registry
from .tools.artifact import ArtifactTool
from .tools.duckdb import INSTALL_HINT
from .tools.playbook import PlaybookTool
from .tracing import CommandTraces, TracedSink
from .watchers import CancelWatcher, QueueSampler, prune_runtime
from .workbook import Workbooks, expander

logger = logging.getLogger(__name__)


#: At shutdown, outcomes get at least this long to be written, whatever --shutdown-timeout.
STOP_WRITE_MIN = 5.0
#: Each other step of a shutdown (release claims, go offline, …) waits at most this long.
STOP_STEP_TIMEOUT = 2.0


def preparer(
    server: NoetlServer | None, pool: ConnectionPool[Any] | None
) -> Callable[[Command], Command]:
    """What the dispatcher does to a command before its tool runs: the context fields NoETL
    moved out of the row brought back, then a workbook step made its action's command."""
    resolve = resolver(server)
    expand = expander(Workbooks(pool.connection) if pool is not None else None)
    return lambda command: expand(resolve(command))


class WorkerThreadDied(PgWorkerError):
    """A thread the worker needs has died."""


@dataclass(frozen=True, slots=True)
class RunSummary:
    claimed: int
    completed: int
    failed: int
    cancelled: int
    reclaimed: int
    poisoned: int
    fenced: int
    released: int
    unwritten: int
    seconds: float
    #: running commands the stop interrupted, put back to PENDING
    given_back: int = 0

    @property
    def clean(self) -> bool:
        return self.unwritten == 0


@dataclass
class Parts:
    """What one run is made of (built by :meth:`Worker._build`, in start order)."""

    source: CommandSource
    reporter: Reporter
    dispatcher: Dispatcher
    pool: ConnectionPool[Any] | None = None
    heartbeat: Heartbeat | None = None
    health: HealthServer | None = None
    listener: Listener | None = None
    server: NoetlServer | None = None
    checker: BatchChecker | None = None
    cmd_heartbeats: CommandHeartbeats | None = None
    spool: Spool | None = None
    #: The worker's own threads (the queue sampler, the readiness announcement).
    helpers: list[threading.Thread] = field(default_factory=list)

    def threads(self) -> list[threading.Thread]:
        """The threads that must live as long as the worker runs."""
        found = [
            self.reporter.thread,
            *(p.thread for p in (self.heartbeat, self.listener, self.cmd_heartbeats) if p),
            *([self.checker.thread] if self.checker else []),
            *(self.health.threads if self.health else []),
        ]
        return found


def _registry(settings: Settings) -> ToolRegistry:
    """The tools of a worker with these settings (``playbook``, a sub-playbook started through
    NoETL's server, and ``artifact``, a result it keeps by reference, only in server mode)."""
    registry = default_registry(
        python_mode=settings.python_mode,
        python_memory_mb=settings.python_memory_mb,
        run_as=settings.run_as,
        child_max_procs=settings.child_max_procs,
        child_max_file_mb=settings.child_max_file_mb,
        child_cpu_seconds=settings.child_cpu_seconds,
        python_preload=settings.python_preload,
        confinement=Confinement(
            max_result_bytes=settings.max_result_bytes,
            duckdb_dir=settings.duckdb_dir,
            script_dir=settings.script_dir,
            duckdb_allowed_dirs=settings.duckdb_allowed_dirs,
            http_allow_loopback=settings.http_allow_loopback,
            own_ports=() if settings.metrics_port is None else (settings.metrics_port,),
        ),
    )
    if settings.server_url:
        registry.register(PlaybookTool(settings.server_url))
        registry.register(ArtifactTool(settings.server_url))
    return registry


class Worker:
    """One worker process's worth of claiming, running and reporting.

    ``source`` (a factory given the worker's :class:`SourceHooks`) and ``sink`` replace the
    PostgreSQL source and the direct or HTTP sink; with both, no database is used.
    """

    def __init__(
        self,
        settings: Settings,
        registry: ToolRegistry | None = None,
        *,
        notifier: Notifier | None = None,
        source: SourceFactory | None = None,
        sink: Sink | None = None,
        traces: CommandTraces | None = None,
    ) -> None:
        self.settings = settings
        #: Command traces (OpenTelemetry), when configured; None (nothing done) otherwise.
        self.traces = traces or tracing.from_settings(settings.worker_id, settings.otlp_endpoint)
        self.notifier = notifier
        self._source_factory = source
        self._sink = sink
        #: The database is needed for whatever part is not injected.
        self.uses_database = source is None or sink is None
        self.registry = registry or _registry(settings)
        local = EnvCredentials()
        local.check()
        # In server mode an `auth` key the worker does not know is asked of NoETL's server, as
        # NoETL's own worker does (GET /api/credentials/{key}).
        self.credentials: CredentialProvider = (
            ServerCredentials(settings.server_url, local=local) if settings.server_url else local
        )
        kinds = settings.tool_kinds or self.registry.kinds()
        unknown = [k for k in kinds if k not in self.registry]
        if unknown:
            hint = f" ({INSTALL_HINT})" if "duckdb" in unknown else ""
            raise ConfigError(
                f"unknown tool kind(s) {', '.join(unknown)}; available: "
                + ", ".join(self.registry.kinds())
                + hint
            )
        self.tool_kinds: tuple[str, ...] = tuple(kinds)
        self.inflight = InFlight(settings.concurrency, settings.max_pending_writes)
        self._stop = threading.Event()
        #: This process's token in its connections' names (``incarnation.py``).
        self.incarnation = new_token()
        self._wake = threading.Event()
        #: set by a NOTIFY 'cancel': look for cancellation requests now
        self._cancel_wake = threading.Event()
        #: running commands' handles (cancel), and the stop that reaches their processes
        self.interrupts = Interrupts()
        self._ready = threading.Event()
        #: the internal thread whose death stopped the worker
        self._died: str | None = None
        self._progress = time.monotonic()
        #: When the claim loop may try again to give back commands claimed ahead.
        self._give_back_after = 0.0
        #: False through a transaction-pooling proxy without a session DSN (no LISTEN, polling),
        #: and without a database.
        self._listens = self.uses_database and (
            settings.pool_mode != "transaction" or bool(settings.session_dsn)
        )
        #: Threads that must live as long as the worker runs; one that ends stops the worker.
        self._watched: list[threading.Thread] = []
        self._parts: Parts | None = None
        self._metrics: NullMetrics = NullMetrics()

    # -- control from other threads ------------------------------------------------------------

    def stop(self) -> None:
        """Graceful stop: claim nothing more, finish what runs, write everything, exit."""
        self.interrupts.stop()
        self._stop.set()
        self._wake.set()

    def keep_unwritten(self) -> int:
        """Save the outcomes not written yet in the spool now (a stop that ran out of time);
        how many were kept (0 without a spool directory)."""
        parts = self._parts
        if parts is None or parts.spool is None:
            return 0
        return parts.reporter.keep(parts.spool)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_ready(self, timeout: float) -> bool:
        """True once the worker is claiming (schema checked, listener up)."""
        return self._ready.wait(timeout)

    # -- what the parts are, for the metrics, /readyz, status and tests -------------------------

    @property
    def reporter(self) -> Reporter | None:
        return self._parts.reporter if self._parts else None

    @property
    def source(self) -> CommandSource | None:
        return self._parts.source if self._parts else None

    @property
    def listener(self) -> Listener | None:
        return self._parts.listener if self._parts else None

    @property
    def heartbeat(self) -> Heartbeat | None:
        return self._parts.heartbeat if self._parts else None

    @property
    def batch_checker(self) -> BatchChecker | None:
        return self._parts.checker if self._parts else None

    @property
    def health(self) -> HealthServer | None:
        return self._parts.health if self._parts else None

    @property
    def metrics(self) -> NullMetrics:
        return self._metrics

    # -- health ----------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._progress = time.monotonic()
        dead = self.dead_thread()
        if dead is not None:
            self._died = dead  # (before the stop: /readyz keeps saying why)
            raise WorkerThreadDied(
                f"internal thread {dead} died; stopping so that this worker's claims are taken"
                " back (see its traceback above)"
            )

    def dead_thread(self) -> str | None:
        """The name of a thread this worker started that ended while it runs, if any."""
        if self._stop.is_set():
            return None
        for thread in self._watched:
            if not thread.is_alive():
                return thread.name
        return None

    def loop_alive(self, max_age: float) -> bool:
        """The claim loop showed progress within ``max_age`` seconds and no internal thread
        died (the watchdog's test: a wedged worker must not keep feeding it)."""
        fresh = time.monotonic() - self._progress < max_age
        return fresh and self._died is None and self.dead_thread() is None

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: database reachable (a recent heartbeat), listener up, not stopping."""
        dead = self._died or self.dead_thread()
        if dead is None and self._stop.is_set():
            return False, "shutting down"
        if dead is not None:
            return False, f"internal thread {dead} died"
        if self.uses_database:
            if self._heartbeat_age() == float("inf"):
                return False, "starting"
            if self._heartbeat_age() > 3 * self.settings.heartbeat_interval:
                return False, "database unreachable (heartbeat failing)"
        elif not self._ready.is_set():
            return False, "starting"
        listener = self.listener
        if self._listens and (listener is None or not listener.connected):
            return False, "listener down (polling)"
        return True, "ready"

    def _heartbeat_age(self) -> float:
        hb = self.heartbeat
        if hb is None or hb.last_ok is None:
            return float("inf")
        return time.monotonic() - hb.last_ok

    def in_flight(self) -> int:
        """Commands running on a thread now."""
        return self.inflight.running()

    def _counts(self) -> tuple[int, int]:
        """Outcomes written so far: (completed, failed)."""
        stats = self.reporter.stats if self.reporter else None
        if stats is None:
            return 0, 0
        return stats.written - stats.failed_outcomes, stats.failed_outcomes

    def _runtime_stats(self) -> dict[str, int]:
        """What the heartbeat publishes in ``noetl.runtime.runtime`` (for ``status --watch``)."""
        completed, failed = self._counts()
        out = {"in_flight": self.in_flight(), "completed": completed, "failed": failed}
        if self.batch_checker is not None:
            out["server_batches_failed"] = self.batch_checker.failed_total
        return out

    def status_line(self) -> str:
        completed, failed = self._counts()
        return f"in flight {self.in_flight()}, completed {completed}, failed {failed}"

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Build, start, claim until stopped (or drained), shut down; the summary."""
        t0 = time.monotonic()
        self.registry.start()  # the fork server, before any command
        with contextlib.ExitStack() as closing:
            pool = (
                open_pool(self.settings, closing, self.incarnation) if self.uses_database else None
            )
            session = (
                open_session(
                    self.settings,
                    self._held_ids,
                    closing,
                    listens=self._listens,
                    incarnation=self.incarnation,
                )
                if pool is not None and self._source_factory is None
                else None
            )
            parts = self._parts = self._build(pool, session)
            self._register(parts)
            released = 0
            try:
                self._start(parts)
                self._claim_loop(parts)
            finally:
                released = self._shut_down(parts)
        return self._summarise(parts, released, t0)

    def _build(self, pool: ConnectionPool[Any] | None, session: ClaimSession | None) -> Parts:
        """Every part, wired; nothing runs yet."""
        s = self.settings
        self._metrics = self._build_metrics()
        health = self._build_health()
        server = NoetlServer(s.server_url) if s.server_url else None
        checker = BatchChecker(server, metrics=self._metrics) if server else None
        sink = self._build_sink(pool, server, checker)
        if self.traces is not None:
            sink = TracedSink(sink, self.traces)
        reporter = self._build_reporter(sink)
        hooks = SourceHooks(
            stop=self._stop,
            wake=self._wake,
            free_slots=lambda: self.inflight.gathered_free(s.claim_gather),
            ahead=self.inflight.ahead,
            held=self._held_ids,
            tick=self._tick,
            on_malformed=self._malformed,
            on_poisoned=self._poisoned if server else None,
            woken_at=self._woken_at,
        )
        if self._source_factory is not None:
            source = self._source_factory(hooks)
        else:
            assert pool is not None and session is not None
            source = self._pg_source(pool, session, hooks)
        dispatcher = Dispatcher(
            self.registry,
            self.inflight,
            reporter,
            timeout=s.command_timeout,
            credentials=self.credentials,
            prepare=preparer(server, pool),
            interrupts=self.interrupts,
        )
        parts = Parts(source, reporter, dispatcher, pool=pool, health=health, server=server)
        parts.checker = checker
        self._add_background(parts)
        return parts

    def _build_reporter(self, sink: Sink) -> Reporter:
        s = self.settings
        return Reporter(
            sink,
            flush_interval=s.flush_interval,
            flush_max=s.flush_max,
            start_delay=s.start_write_delay,
            gather=s.write_gather,
            busy=lambda: self.inflight.outcomes_worth_gathering(s.write_gather),
            enough=s.concurrency,
            on_done=self._written,
            metrics=self._metrics,
        )

    def _add_background(self, parts: Parts) -> None:
        """The parts that run beside the claim loop: heartbeat, listener, command heartbeats,
        spool."""
        s = self.settings
        pool, server = parts.pool, parts.server
        if pool is not None:
            parts.heartbeat = Heartbeat(
                pool,
                worker_id=s.worker_id,
                capacity=s.concurrency,
                tool_kinds=self.tool_kinds,
                interval=s.heartbeat_interval,
                stats=self._runtime_stats,
            )
        if self._listens:
            listen_dsn = s.session_dsn or s.dsn
            parts.listener = Listener(
                listen_dsn,
                self._wake,
                cancel_wake=self._cancel_wake,
                application_name=application_name("listener", s.worker_id, self.incarnation),
                connect_timeout=s.connect_timeout,
                check_interval=s.listener_check_interval,
                network_timeout=s.network_timeout,
                session_options=worker_session_kwargs(
                    listen_dsn, session_mode(s), s.network_timeout
                ),
            )
        if server is not None:
            parts.cmd_heartbeats = CommandHeartbeats(
                server, s.worker_id, self.inflight.running_since
            )
        if s.spool_dir:
            parts.spool = Spool(Path(s.spool_dir), s.worker_id)

    def _build_metrics(self) -> NullMetrics:
        if self.settings.metrics_port is None:
            return NullMetrics()
        return Metrics(
            in_flight=self.in_flight,
            free_slots=lambda: self.inflight.concurrency - self.inflight.threads_busy(),
            pending_writes=lambda: self.reporter.pending() if self.reporter else 0,
            listener_reconnects=lambda: self.listener.reconnects if self.listener else 0,
            heartbeat_age=self._heartbeat_age,
        )

    def _build_health(self) -> HealthServer | None:
        s = self.settings
        if s.metrics_port is None:
            return None
        assert isinstance(self._metrics, Metrics)
        try:
            health = HealthServer(s.metrics_host, s.metrics_port, self._metrics, self.readiness)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: {exc.strerror}"
            ) from exc
        http = self.registry.get("http") if "http" in self.registry else None
        if http is not None and hasattr(http, "own_ports"):  # (port 0: the one it got)
            http.own_ports = (*http.own_ports, health.port)
        return health

    def _build_sink(
        self,
        pool: ConnectionPool[Any] | None,
        server: NoetlServer | None,
        checker: BatchChecker | None,
    ) -> Sink:
        if self._sink is not None:
            return self._sink
        assert pool is not None
        s = self.settings
        if server is not None:
            return HttpSink(server, pool, s.worker_id, checker)
        return PgSink(pool, s.worker_id, max_result_bytes=s.max_result_bytes)

    def _pg_source(
        self, pool: ConnectionPool[Any], session: ClaimSession, hooks: SourceHooks
    ) -> PgCommandSource:
        s = self.settings
        return PgCommandSource(
            pool,
            worker_id=s.worker_id,
            tool_kinds=self.tool_kinds,
            hooks=hooks,
            options=ClaimOptions(
                poll_interval=s.poll_interval,
                drain=s.drain,
                lease=s.lease,
                stale_after=s.stale_after,
                max_attempts=s.max_attempts,
            ),
            metrics=self._metrics,
            session=session,
        )

    def _register(self, parts: Parts) -> None:
        """The runtime row, before anything runs (a database that refuses it stops us here)."""
        if parts.heartbeat is not None:
            with wrap_errors(self.settings.dsn, "registering the worker"):
                parts.heartbeat.beat()
        if parts.pool is not None:
            prune_runtime(parts.pool, self.settings.dsn)

    def _start(self, parts: Parts) -> None:
        """Start every part's threads, then watch them."""
        s = self.settings
        if parts.health is not None:
            parts.health.start()
        if parts.spool is not None:
            kept = parts.spool.take()
            if kept:
                logger.warning(
                    "writing %d outcome(s) an earlier run kept in %s",
                    len(kept),
                    parts.spool.path,
                    extra={"action": "spool_restored"},
                )
                parts.reporter.restore(kept)
        parts.reporter.start()
        for part in (parts.heartbeat, parts.listener, parts.cmd_heartbeats, parts.checker):
            if part is not None:
                part.start()
        if parts.listener is not None and not parts.listener.wait_connected(s.connect_timeout):
            logger.warning(
                "listener not connected yet; polling every %.1f s meanwhile", s.poll_interval
            )
        logger.info(
            "worker %s started: %d threads, tool kinds %s, %s, %s%s",
            s.worker_id,
            s.concurrency,
            ",".join(self.tool_kinds),
            f"database {redact_dsn(s.dsn)}" if self.uses_database else "no database",
            f"reporting to NoETL server {s.server_url}"
            if parts.server
            else "writing outcomes directly",
            " (drain mode)" if s.drain else "",
            extra={"action": "started"},
        )
        self._watched = parts.threads()
        self._ready.set()
        self._start_helpers(parts)

    def _start_helpers(self, parts: Parts) -> None:
        s = self.settings
        if parts.pool is not None and s.metrics_port is not None:
            sampler = QueueSampler(
                parts.pool,
                worker_id=s.worker_id,
                tool_kinds=self.tool_kinds,
                lease=s.lease,
                stale_after=s.stale_after,
                stop=self._stop,
                metrics=self._metrics,
            )
            self._watched.append(self._helper(parts, "noetl-pgworker-sampler", sampler.run))
        if parts.pool is not None:
            cancels = CancelWatcher(
                parts.pool,
                self.interrupts,
                wake=self._cancel_wake,
                stop=self._stop,
                running=self.inflight.running,
                interval=min(s.poll_interval, 5.0),
                metrics=self._metrics,
            )
            self._helper(parts, "noetl-pgworker-cancels", cancels.run)
        if self.notifier is not None:
            self._helper(parts, "noetl-pgworker-ready", self._announce, parts.source)
            self.notifier.start_watchdog(self.loop_alive, self.status_line)

    @staticmethod
    def _helper(parts: Parts, name: str, target: Any, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        parts.helpers.append(thread)
        return thread

    def _announce(self, source: CommandSource) -> None:
        """Tell systemd we are ready once the first claim went through."""
        assert self.notifier is not None
        deadline = time.monotonic() + self.settings.connect_timeout * 3
        while not self._stop.is_set() and time.monotonic() < deadline:
            if source.first_claim.wait(0.2):
                if not self._stop.is_set():
                    self.notifier.ready(self.status_line())
                return

    def _claim_loop(self, parts: Parts) -> None:
        """Reserve a thread and a claim, take the next command, run it; until stopped."""
        source, inflight = parts.source, self.inflight
        while not self._stop.is_set():
            self._tick()
            if not inflight.reserve(timeout=0.5):
                self._give_back_waiting(source)
                continue
            try:
                command = source.next()
            except BaseException:
                inflight.unreserve()
                raise
            if command is None:
                inflight.unreserve()
                break
            threads_held = 1
            if (
                command.attempt > 1
                and inflight.concurrency > 1
                and not self.registry.runs_apart(command.tool_kind)
            ):
                # Taken back from a worker that died: it may be what killed it. Unless it runs
                # in a process of its own (where it can only kill itself), run it alone, so that
                # if it kills this worker too, no innocent command is abandoned with it: the
                # others claimed with it go back to PENDING first.
                try:
                    source.release_unstarted()
                except Exception as exc:  # they will be recovered after the lease
                    logger.warning("could not release claims before a suspect command: %s", exc)
                others = inflight.take_other_threads(self._stop)
                if others is None:
                    source.unread(command)
                    inflight.unreserve()
                    break
                threads_held += others
            inflight.hold(command.ref, threads_held)
            if self.traces is not None:
                self.traces.claimed(command, command.created_at)
            parts.dispatcher.submit(command)
        if self.settings.drain:
            # Drained: the queue has nothing left for us; let what runs finish (a signal still
            # cuts this short, and then the shutdown timeout applies).
            while not self._stop.is_set() and not inflight.wait_idle(0.2):
                pass

    def _shut_down(self, parts: Parts) -> int:
        """Stop in order, each step bounded; how many unstarted claims went back to PENDING.

        Running commands get --shutdown-timeout, writing their outcomes what is left of it (at
        least STOP_WRITE_MIN); the rest (release, offline, closing) takes a few seconds more at
        most, each step with its own timeout.
        """
        s = self.settings
        self._stop.set()
        deadline = time.monotonic() + s.shutdown_timeout
        if self.notifier is not None:
            self.notifier.stopping()
        released = self._release_unstarted(parts.source)
        self._stop_running(parts.dispatcher)
        self._write_last(parts, deadline)
        if parts.listener is not None:
            parts.listener.stop()
        if parts.cmd_heartbeats is not None:
            parts.cmd_heartbeats.stop()
        if parts.checker is not None:
            # Learn how the last batches ended before going offline (bounded).
            parts.checker.drain(timeout=min(STOP_STEP_TIMEOUT, max(0.5, s.shutdown_timeout)))
            parts.checker.stop()
        if parts.server is not None:
            parts.server.close()
        if parts.heartbeat is not None:
            # A worker id taken over by another process is not ours to mark offline.
            taken = isinstance(parts.source, PgCommandSource) and parts.source.session.id_taken
            parts.heartbeat.stop(mark_offline=not taken, timeout=STOP_STEP_TIMEOUT)
        for helper in parts.helpers:
            threads.join(helper, STOP_STEP_TIMEOUT)
        parts.source.close()
        self.registry.close()
        if isinstance(self.credentials, ServerCredentials):
            self.credentials.close()
        if parts.health is not None:
            parts.health.stop()
        if self.notifier is not None:
            self.notifier.close()
        return released

    def _write_last(self, parts: Parts, deadline: float) -> None:
        """The outcomes still to write, in what is left of the shutdown timeout (at least
        STOP_WRITE_MIN); then the traces of this worker's commands (a step like the others)."""
        parts.reporter.close(
            timeout=max(STOP_WRITE_MIN, deadline - time.monotonic()), spool=parts.spool
        )
        if self.traces is not None:
            self.traces.close(timeout=STOP_STEP_TIMEOUT)

    def _stop_running(self, dispatcher: Dispatcher) -> None:
        """Let running commands finish within --shutdown-timeout; then kill the python and
        shell processes still running (their commands go back to PENDING). What runs on a
        thread of its own (http, postgres, inline python) cannot be stopped: it is left to
        recovery."""
        if dispatcher.shutdown(self.settings.shutdown_timeout):
            return
        self.interrupts.abort()
        if not dispatcher.shutdown(STOP_STEP_TIMEOUT):
            logger.error(
                "%d command(s) still running after %.0f s; leaving them for recovery",
                self.inflight.threads.in_use(),
                self.settings.shutdown_timeout,
                extra={"action": "shutdown_timeout"},
            )

    def _give_back_waiting(self, source: CommandSource) -> None:
        """Commands claimed ahead that found no thread for half a second (the commands running
        turned out long): back to PENDING, for a worker with a free thread."""
        if not source.buffered() or time.monotonic() < self._give_back_after:
            return
        released = self._release_unstarted(source)
        if source.buffered():  # the database is away: try again in a while, not every loop
            self._give_back_after = time.monotonic() + 5.0
        if released:
            logger.info(
                "gave back %d command(s) claimed ahead: no thread freed up for them",
                released,
                extra={"action": "gave_back_unstarted", "count": released},
            )

    def _release_unstarted(self, source: CommandSource) -> int:
        try:
            return source.release_unstarted(timeout=STOP_STEP_TIMEOUT)
        except Exception as exc:
            logger.warning(
                "could not put %d unstarted command(s) back to PENDING (%s); they will be"
                " recovered after the lease",
                source.buffered(),
                redact_text(str(exc), self.settings.dsn),
            )
            return 0

    def _summarise(self, parts: Parts, released: int, t0: float) -> RunSummary:
        stats, counts = parts.reporter.stats, parts.source.counts
        summary = RunSummary(
            claimed=counts.claimed,
            completed=stats.written - stats.failed_outcomes,
            failed=stats.failed_outcomes,
            cancelled=counts.cancelled + stats.cancelled,
            reclaimed=counts.reclaimed,
            poisoned=counts.poisoned,
            fenced=stats.fenced,
            released=released,
            unwritten=parts.reporter.pending(),
            seconds=time.monotonic() - t0,
            given_back=stats.given_back,
        )
        logger.info(
            "worker %s stopped: %d claimed, %d completed, %d failed, %d cancelled, %d released,"
            " %d given back, %d unwritten",
            self.settings.worker_id,
            summary.claimed,
            summary.completed,
            summary.failed,
            summary.cancelled,
            summary.released,
            summary.given_back,
            summary.unwritten,
            extra={"action": "stopped"},
        )
        return summary

    # -- hooks: what the parts tell the worker ---------------------------------------------------

    def _woken_at(self) -> float | None:
        listener = self.listener
        return listener.last_notify if listener is not None else None

    def _malformed(self, ref: CommandRef, reason: str) -> None:
        """A claimed row that is not a command: failed at once, its claim held until written."""
        assert self.reporter is not None
        self.inflight.hold_claim(ref)
        self.reporter.finished(ref, Outcome.failure(reason, error_type="malformed_command"))

    def _poisoned(self, ref: CommandRef, error: str) -> None:
        """Server mode: tell NoETL's engine about a command failed as poison (already FAILED
        in SQL), so that the workflow reacts to the failure."""
        assert self.reporter is not None
        self.reporter.finished(ref, Outcome.failure(error, error_type="abandoned"), unfenced=True)

    def _written(self, ref: CommandRef) -> None:
        """An outcome is written (or refused by the fence): its claim is no longer held."""
        if self._parts is not None:
            self._parts.source.done((ref.command_id,))
        self.inflight.written(ref)

    def _held_ids(self) -> list[int]:
        """Command ids this process holds: running, or waiting for their outcome to be written."""
        held = self.inflight.held_ids()
        if self.reporter is not None:
            held += self.reporter.pending_ids()
        return held
