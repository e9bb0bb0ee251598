"""The worker's lifecycle: start the parts in order, run the claim loop, stop in order.

Order at start: connection pool → schema check → runtime row → reporter → listener → claim
loop. Order at stop: stop claiming → put unstarted claims back to PENDING → let running
commands finish (bounded) → flush outcomes → stop listener and heartbeat → runtime offline.
Signals are the CLI's business: it calls :meth:`Worker.stop` (graceful) from its handler.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool, PoolTimeout

from . import schema
from .batches import BatchChecker
from .config import Settings
from .credentials import CredentialProvider, EnvCredentials
from .db import (
    PoolMode,
    connect_kwargs,
    redact_dsn,
    redact_text,
    worker_session_kwargs,
    wrap_errors,
)
from .dispatcher import Dispatcher, Slots
from .errors import ConfigError, DatabaseUnavailable, PgWorkerError
from .listener import Listener
from .metrics import HealthServer, Metrics, NullMetrics
from .models import Command, CommandRef, Outcome
from .queries import query
from .reporter import PgSink, Reporter, Sink
from .runtime import Heartbeat
from .sdnotify import Notifier
from .server import CommandHeartbeats, HttpSink, NoetlServer, resolver
from .server_credentials import ServerCredentials
from .session import ClaimSession
from .source import PgCommandSource
from .spool import Spool
from .tools import ToolRegistry, default_registry

logger = logging.getLogger(__name__)


#: At shutdown, outcomes get at least this long to be written, whatever --shutdown-timeout.
STOP_WRITE_MIN = 5.0
#: Each other step of a shutdown (release claims, go offline, …) waits at most this long.
STOP_STEP_TIMEOUT = 2.0


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

    @property
    def clean(self) -> bool:
        return self.unwritten == 0


class Worker:
    """One worker process's worth of claiming, running and reporting."""

    def __init__(
        self,
        settings: Settings,
        registry: ToolRegistry | None = None,
        *,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.notifier = notifier
        self.metrics: NullMetrics = NullMetrics()
        self.health: HealthServer | None = None
        self.heartbeat: Heartbeat | None = None
        self._progress = time.monotonic()
        self.registry = registry or default_registry(
            python_mode=settings.python_mode,
            python_memory_mb=settings.python_memory_mb,
            run_as=settings.run_as,
            child_max_procs=settings.child_max_procs,
            child_max_file_mb=settings.child_max_file_mb,
            child_cpu_seconds=settings.child_cpu_seconds,
            python_preload=settings.python_preload,
        )
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
            raise ConfigError(
                f"unknown tool kind(s) {', '.join(unknown)}; available: "
                + ", ".join(self.registry.kinds())
            )
        self.tool_kinds: tuple[str, ...] = tuple(kinds)
        #: One per thread: taken before a claim, given back when the tool is done.
        self.slots = Slots(settings.concurrency)
        pending = settings.max_pending_writes
        #: One per claim held in the database: given back when its outcome is written. The
        #: threads can run the next commands while a write is in flight, within this bound.
        self.claims = Slots(
            settings.concurrency + (settings.concurrency if pending is None else pending)
        )
        self._claim_holders: set[tuple[int, int]] = set()
        self._running: dict[tuple[int, int], tuple[CommandRef, float]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._pool: ConnectionPool[Any] | None = None
        # Commands running on a thread, and how many thread slots each holds.
        self._holders: dict[tuple[int, int], int] = {}
        self._holders_lock = threading.Lock()
        self.reporter: Reporter | None = None
        self.source: PgCommandSource | None = None
        self.batch_checker: BatchChecker | None = None
        #: Threads that must live as long as the worker runs; one that ends stops the worker.
        self._watched: list[threading.Thread] = []
        self.listener: Listener | None = None
        #: False through a transaction-pooling proxy without a session DSN: no LISTEN, polling.
        self._listens = settings.pool_mode != "transaction" or bool(settings.session_dsn)

    # -- control from other threads ------------------------------------------------------------

    def stop(self) -> None:
        """Graceful stop: claim nothing more, finish what runs, write everything, exit."""
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _tick(self) -> None:
        self._progress = time.monotonic()
        dead = self.dead_thread()
        if dead is not None:
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
        return time.monotonic() - self._progress < max_age and self.dead_thread() is None

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: database reachable (a recent heartbeat), listener up, not stopping."""
        if self._stop.is_set():
            return False, "shutting down"
        dead = self.dead_thread()
        if dead is not None:
            return False, f"internal thread {dead} died"
        hb = self.heartbeat
        if hb is None or hb.last_ok is None:
            return False, "starting"
        if time.monotonic() - hb.last_ok > 3 * self.settings.heartbeat_interval:
            return False, "database unreachable (heartbeat failing)"
        if self._listens and (self.listener is None or not self.listener.connected):
            return False, "listener down (polling)"
        return True, "ready"

    def _heartbeat_age(self) -> float:
        hb = self.heartbeat
        if hb is None or hb.last_ok is None:
            return float("inf")
        return time.monotonic() - hb.last_ok

    def in_flight(self) -> int:
        """Commands running on a thread now."""
        with self._holders_lock:
            return len(self._holders)

    def _threads_busy(self) -> int:
        with self._holders_lock:
            return sum(self._holders.values())

    def _runtime_stats(self) -> dict[str, int]:
        """What the heartbeat publishes in ``noetl.runtime.runtime`` (for ``status --watch``)."""
        stats = self.reporter.stats if self.reporter else None
        out = {
            "in_flight": self.in_flight(),
            "completed": stats.written - stats.failed_outcomes if stats else 0,
            "failed": stats.failed_outcomes if stats else 0,
        }
        if self.batch_checker is not None:
            out["server_batches_failed"] = self.batch_checker.failed_total
        return out

    def status_line(self) -> str:
        stats = self.reporter.stats if self.reporter else None
        done = stats.written - stats.failed_outcomes if stats else 0
        failed = stats.failed_outcomes if stats else 0
        return f"in flight {self.in_flight()}, completed {done}, failed {failed}"

    def wait_ready(self, timeout: float) -> bool:
        """True once the worker is claiming (schema checked, listener up)."""
        return self._ready.wait(timeout)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        s = self.settings
        t0 = time.monotonic()
        self.registry.start()  # the fork server, before any command
        app = f"noetl-pgworker:{s.worker_id}"
        pool: ConnectionPool[Any] = ConnectionPool(
            s.dsn,
            min_size=3,
            max_size=4,
            kwargs={
                **connect_kwargs(app, s.connect_timeout, s.pool_mode),
                **worker_session_kwargs(s.dsn, s.pool_mode),
            },
            name="noetl-pgworker",
            open=False,
            timeout=30,
        )
        self._pool = pool
        try:
            pool.open(wait=True, timeout=s.connect_timeout + 1)
        except PoolTimeout as exc:
            pool.close(timeout=1)
            probe = _probe_error(s.dsn, s.connect_timeout)
            raise DatabaseUnavailable(f"cannot connect to {redact_dsn(s.dsn)}: {probe}") from exc
        try:
            return self._run_with_pool(pool, t0)
        finally:
            pool.close(timeout=5)

    def _run_with_pool(self, pool: ConnectionPool[Any], t0: float) -> RunSummary:
        s = self.settings
        if s.verify_schema:
            with wrap_errors(s.dsn, "checking the schema"), pool.connection(timeout=10) as conn:
                schema.require(conn)
        session_dsn = s.session_dsn or s.dsn
        # A session DSN is a session (direct, or a session-pooling proxy); else the claim
        # session goes where --dsn goes, and through transaction pooling holds no session lock.
        session_mode: PoolMode = s.pool_mode
        if s.session_dsn and s.pool_mode == "transaction":
            session_mode = "session"
        session = ClaimSession(
            session_dsn,
            worker_id=s.worker_id,
            application_name=f"noetl-pgworker-claim:{s.worker_id}",
            connect_timeout=s.connect_timeout,
            held=self._held_ids,
            pool_mode=session_mode,
            connect_options=worker_session_kwargs(session_dsn, session_mode),
        )
        self._log_pool_mode(session.session_locks)
        with wrap_errors(session_dsn, "opening the claim session"):
            session.open()  # refuses a second process with this worker id
        try:
            return self._run_with_session(pool, session, t0)
        finally:
            session.close()

    def _run_with_session(
        self, pool: ConnectionPool[Any], session: ClaimSession, t0: float
    ) -> RunSummary:
        s = self.settings
        heartbeat = self.heartbeat = Heartbeat(
            pool,
            worker_id=s.worker_id,
            capacity=s.concurrency,
            tool_kinds=self.tool_kinds,
            interval=s.heartbeat_interval,
            stats=self._runtime_stats,
        )
        with wrap_errors(s.dsn, "registering the worker"):
            heartbeat.beat()
        if s.metrics_port is not None:
            self.metrics = Metrics(
                in_flight=self.in_flight,
                free_slots=lambda: self.settings.concurrency - self._threads_busy(),
                pending_writes=lambda: self.reporter.pending() if self.reporter else 0,
                listener_reconnects=lambda: self.listener.reconnects if self.listener else 0,
                heartbeat_age=self._heartbeat_age,
            )
            try:
                self.health = HealthServer(
                    s.metrics_host, s.metrics_port, self.metrics, self.readiness
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: {exc.strerror}"
                ) from exc
            self.health.start()
        server = NoetlServer(s.server_url) if s.server_url else None
        checker = self.batch_checker = (
            BatchChecker(server, metrics=self.metrics) if server else None
        )
        sink: Sink = (
            HttpSink(server, pool, s.worker_id, checker) if server else PgSink(pool, s.worker_id)
        )
        reporter = self.reporter = Reporter(
            sink,
            s.worker_id,
            flush_interval=s.flush_interval,
            flush_max=s.flush_max,
            max_result_bytes=s.max_result_bytes,
            on_done=self._written,
            metrics=self.metrics,
        )
        source = self.source = PgCommandSource(
            pool,
            worker_id=s.worker_id,
            tool_kinds=self.tool_kinds,
            free_slots=lambda: min(self.slots.available(), self.claims.available()),
            wake=self._wake,
            stop=self._stop,
            poll_interval=s.poll_interval,
            drain=s.drain,
            on_malformed=self._malformed,
            lease=s.lease,
            stale_after=s.stale_after,
            max_attempts=s.max_attempts,
            held=self._held_ids,
            metrics=self.metrics,
            tick=self._tick,
            woken_at=lambda: self.listener.last_notify if self.listener else None,
            on_poisoned=self._poisoned if server else None,
            session=session,
        )
        listener = self.listener = (
            Listener(
                s.session_dsn or s.dsn,
                self._wake,
                application_name=f"noetl-pgworker-listener:{s.worker_id}",
                connect_timeout=s.connect_timeout,
                check_interval=s.listener_check_interval,
            )
            if self._listens
            else None
        )
        dispatcher = Dispatcher(
            self.registry,
            self.slots,
            on_start=self._started,
            on_finish=self._finished_cmd,
            timeout=s.command_timeout,
            credentials=self.credentials,
            prepare=resolver(server),
        )
        cmd_heartbeats = (
            CommandHeartbeats(server, s.worker_id, self._running_since) if server else None
        )
        spool = Spool(Path(s.spool_dir), s.worker_id) if s.spool_dir else None
        if spool is not None:
            kept = spool.take()
            if kept:
                logger.warning(
                    "writing %d outcome(s) an earlier run kept in %s",
                    len(kept),
                    spool.path,
                    extra={"action": "spool_restored"},
                )
                reporter.restore(kept)
        reporter.start()
        heartbeat.start()
        if listener is not None:
            listener.start()
        if cmd_heartbeats is not None:
            cmd_heartbeats.start()
        if checker is not None:
            checker.start()
        if listener is not None and not listener.wait_connected(s.connect_timeout):
            logger.warning(
                "listener not connected yet; polling every %.1f s meanwhile", s.poll_interval
            )
        logger.info(
            "worker %s started: %d threads, tool kinds %s, database %s, %s%s",
            s.worker_id,
            s.concurrency,
            ",".join(self.tool_kinds),
            redact_dsn(s.dsn),
            f"reporting to NoETL server {s.server_url}" if server else "writing outcomes directly",
            " (drain mode)" if s.drain else "",
            extra={"action": "started"},
        )
        self._watched = [
            t
            for t in (
                getattr(reporter, "_thread", None),
                getattr(heartbeat, "_thread", None),
                getattr(listener, "_thread", None),
                getattr(cmd_heartbeats, "_thread", None),
                checker.thread if checker is not None else None,
                *(getattr(self.health, "_threads", None) or []),
            )
            if isinstance(t, threading.Thread)
        ]
        self._ready.set()
        sampler = None
        if s.metrics_port is not None:
            sampler = threading.Thread(
                target=self._sample_queue, args=(pool,), name="noetl-pgworker-sampler", daemon=True
            )
            sampler.start()
            self._watched.append(sampler)
        if self.notifier is not None:
            notifier = self.notifier

            def announce() -> None:
                if source.first_claim.wait(s.connect_timeout * 3) and not self._stop.is_set():
                    notifier.ready(self.status_line())

            threading.Thread(target=announce, name="noetl-pgworker-ready", daemon=True).start()
            notifier.start_watchdog(self.loop_alive, self.status_line)
        released = 0
        try:
            self._claim_loop(source, dispatcher)
        finally:
            self._stop.set()
            # Bounded: running commands get --shutdown-timeout, writing their outcomes what is
            # left of it (at least STOP_WRITE_MIN); the rest (release, offline, closing) takes
            # a few seconds more at most, each step with its own timeout.
            stop_deadline = time.monotonic() + s.shutdown_timeout
            if self.notifier is not None:
                self.notifier.stopping()
            try:
                released = source.release_unstarted(timeout=STOP_STEP_TIMEOUT)
            except Exception as exc:
                logger.warning(
                    "could not put %d unstarted command(s) back to PENDING (%s); they will be"
                    " recovered after the lease",
                    source.buffered(),
                    redact_text(str(exc), s.dsn),
                )
            if not dispatcher.shutdown(s.shutdown_timeout):
                logger.error(
                    "%d command(s) still running after %.0f s; leaving them for recovery",
                    self.slots.in_use(),
                    s.shutdown_timeout,
                    extra={"action": "shutdown_timeout"},
                )
            reporter.close(
                timeout=max(STOP_WRITE_MIN, stop_deadline - time.monotonic()), spool=spool
            )
            if listener is not None:
                listener.stop()
            if cmd_heartbeats is not None:
                cmd_heartbeats.stop()
            if checker is not None:
                # Learn how the last batches ended before going offline (bounded).
                checker.drain(timeout=min(STOP_STEP_TIMEOUT, max(0.5, s.shutdown_timeout)))
                checker.stop()
            if server is not None:
                server.close()
            heartbeat.stop(mark_offline=True, timeout=STOP_STEP_TIMEOUT)
            self.registry.close()
            if isinstance(self.credentials, ServerCredentials):
                self.credentials.close()
            if self.health is not None:
                self.health.stop()
            if self.notifier is not None:
                self.notifier.close()
        stats = reporter.stats
        summary = RunSummary(
            claimed=source.claimed_total,
            completed=stats.written - stats.failed_outcomes,
            failed=stats.failed_outcomes,
            cancelled=source.cancelled_total,
            reclaimed=source.reclaimed_total,
            poisoned=source.poisoned_total,
            fenced=stats.fenced,
            released=released,
            unwritten=reporter.pending(),
            seconds=time.monotonic() - t0,
        )
        logger.info(
            "worker %s stopped: %d claimed, %d completed, %d failed, %d released, %d unwritten",
            s.worker_id,
            summary.claimed,
            summary.completed,
            summary.failed,
            summary.released,
            summary.unwritten,
            extra={"action": "stopped"},
        )
        return summary

    def _log_pool_mode(self, session_locks: bool) -> None:
        """Say once at start how the worker reaches PostgreSQL and what that costs."""
        s = self.settings
        if s.pool_mode == "direct":
            logger.info(
                "pool mode direct: --dsn connects to PostgreSQL itself", extra={"action": "pool"}
            )
            return
        how = (
            "pool mode session: --dsn goes through a session-pooling proxy (no `options`"
            " startup parameter)"
            if s.pool_mode == "session"
            else "pool mode transaction: --dsn goes through a transaction-pooling proxy"
            " (no server-side prepared statements, nothing kept between transactions)"
        )
        if s.pool_mode == "transaction" and s.session_dsn:
            how += f"; LISTEN and the claim session over --session-dsn {redact_dsn(s.session_dsn)}"
        logger.info(how, extra={"action": "pool"})
        if not self._listens:
            logger.warning(
                "pool mode transaction without --session-dsn: no LISTEN (a proxy that pools"
                " transactions cannot deliver notifications); new commands are found by polling"
                " every %.1f s",
                s.poll_interval,
                extra={"action": "pool_polling"},
            )
        if not session_locks:
            logger.warning(
                "pool mode transaction without --session-dsn: claimed commands hold no session"
                " lock (NoETL's server could claim one in the moment after our claim commits),"
                " and one process per --worker-id is not enforced",
                extra={"action": "pool_no_session_locks"},
            )

    def _sample_queue(self, pool: ConnectionPool[Any]) -> None:
        """Queue depth for the metrics, every 15 s (sampled, not per scrape)."""
        while True:
            try:
                with pool.connection(timeout=5) as conn:
                    rows = conn.execute(query("queue_depth")).fetchall()
                    stuck = conn.execute(
                        query("status_stuck"), {"lease": self.settings.lease}
                    ).fetchone()
                self.metrics.queue_depth(
                    {(str(s), str(k)): int(n) for s, k, n in rows}, int(stuck[0]) if stuck else 0
                )
            except Exception:  # a sample missed is no harm
                self.metrics.db_error("sampler")
            if self._stop.wait(15):
                return

    def _claim_loop(self, source: PgCommandSource, dispatcher: Dispatcher) -> None:
        while not self._stop.is_set():
            self._tick()
            # A claim budget (outcomes not yet written count against it: while the database is
            # slow or away they pile up, and claiming stops), then a free thread.
            if not self.claims.acquire(timeout=0.5):
                continue
            if not self.slots.acquire(timeout=0.5):
                self.claims.release()
                continue
            try:
                command = source.next()
            except BaseException:
                self.slots.release()
                self.claims.release()
                raise
            if command is None:
                self.slots.release()
                self.claims.release()
                break
            slots = 1
            if command.attempt > 1 and self.slots.total > 1:
                # Taken back from a worker that died: it may be what killed it. Run it alone,
                # so that if it kills this worker too, no innocent command is abandoned with it:
                # the others claimed with it go back to PENDING first.
                try:
                    source.release_unstarted()
                except Exception as exc:  # they will be recovered after the lease
                    logger.warning("could not release claims before a suspect command: %s", exc)
                extra = self._take_all_slots()
                if extra is None:
                    source.unread(command)
                    self.slots.release()
                    self.claims.release()
                    break
                slots += extra
            key = (command.execution_id, int(command.command_id))
            with self._holders_lock:
                self._holders[key] = slots
                self._claim_holders.add(key)
            dispatcher.submit(command)
        if self.settings.drain:
            # Drained: the queue has nothing left for us; let what runs finish (a signal still
            # cuts this short, and then the shutdown timeout applies).
            while not self._stop.is_set() and not self.slots.wait_idle(0.2):
                pass

    def _take_all_slots(self) -> int | None:
        """Acquire every other slot (waiting for running commands); None if stopped meanwhile."""
        taken = 0
        while taken < self.slots.total - 1:
            if self._stop.is_set():
                for _ in range(taken):
                    self.slots.release()
                return None
            if self.slots.acquire(timeout=0.2):
                taken += 1
        return taken

    # -- callbacks from the tool threads ---------------------------------------------------------

    def _running_since(self) -> list[tuple[CommandRef, float]]:
        with self._holders_lock:
            return list(self._running.values())

    def _started(self, command: Command, at: Any) -> None:
        assert self.reporter is not None
        with self._holders_lock:
            key = (command.execution_id, int(command.command_id))
            self._running[key] = (command.ref, time.monotonic())
        self.reporter.started(
            command.ref, at, loop_event_id=command.loop_event_id, iter_index=command.iter_index
        )

    def _finished_cmd(self, command: Command, outcome: Outcome) -> None:
        """The tool is done: hand the outcome to the writer, then free the thread(s)."""
        assert self.reporter is not None
        self.reporter.finished(
            command.ref,
            outcome,
            loop_event_id=command.loop_event_id,
            iter_index=command.iter_index,
        )
        with self._holders_lock:
            key = (command.execution_id, int(command.command_id))
            slots = self._holders.pop(key, 0)
            self._running.pop(key, None)
        for _ in range(slots):
            self.slots.release()

    def _malformed(self, ref: CommandRef, reason: str) -> None:
        assert self.reporter is not None
        # It was claimed within the free budget; hold a claim until its failure is written.
        if self.claims.acquire(timeout=0):
            with self._holders_lock:
                self._claim_holders.add((ref.execution_id, ref.command_id))
        self.reporter.finished(ref, Outcome.failure(reason, error_type="malformed_command"))

    def _poisoned(self, ref: CommandRef, error: str) -> None:
        """Server mode: tell NoETL's engine about a command failed as poison (already FAILED
        in SQL), so that the workflow reacts to the failure."""
        assert self.reporter is not None
        self.reporter.finished(ref, Outcome.failure(error, error_type="abandoned"), unfenced=True)

    def _written(self, ref: CommandRef) -> None:
        """An outcome is written (or refused by the fence): its claim is no longer held."""
        if self.source is not None:
            self.source.done((ref.command_id,))
        key = (ref.execution_id, ref.command_id)
        with self._holders_lock:
            if key not in self._claim_holders:
                return
            self._claim_holders.discard(key)
        self.claims.release()

    def _held_ids(self) -> list[int]:
        """Command ids this process holds: running, or waiting for their outcome to be written."""
        with self._holders_lock:
            held = [cid for _, cid in self._holders]
        if self.reporter is not None:
            held += self.reporter.pending_ids()
        return held


def _probe_error(dsn: str, timeout: float) -> str:
    """Why a connection fails, in one line (the pool only says it timed out)."""
    from .db import connect

    try:
        connect(dsn, connect_timeout=timeout).close()
    except DatabaseUnavailable as exc:
        return exc.message.split(": ", 1)[-1]
    return "timed out"
