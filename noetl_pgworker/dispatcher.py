"""The dispatcher: a fixed thread pool that runs each command's tool by its kind.

The claim loop reserves a thread (:class:`~noetl_pgworker.inflight.InFlight`) *before* it
claims, so every claimed command starts at once. A command's threads are given back when its
tool is done and its outcome handed to the reporter, whatever happens: the thread can take the
next command while the outcome is being written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol

from .credentials import CredentialProvider, EnvCredentials
from .errors import PgWorkerError, ToolError
from .inflight import InFlight
from .interrupt import Interrupts
from .jsontext import NotSerialisable, dumps
from .models import Command, CommandRef, Outcome, ToolOutput
from .render import ISOLATE
from .tools.base import DEFAULT_COMMAND_TIMEOUT, ToolContext, ToolRegistry, command_timeout
from .tools.returned import returned_failure

logger = logging.getLogger(__name__)


def execute(
    command: Command,
    registry: ToolRegistry,
    *,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
    credentials: CredentialProvider | None = None,
    prepare: Callable[[Command], Command] | None = None,
) -> Outcome:
    """Run one command's tool; never raises (every failure becomes a failed Outcome).

    ``timeout`` is the worker's default; ``tool_config.timeout_seconds|timeout`` overrides it.
    """
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()

    def took() -> float:
        return time.perf_counter() - t0

    try:
        if prepare is not None:
            command = prepare(command)  # e.g. resolve context fields NoETL externalised
        registry.get(command.tool_kind)  # (an unknown kind fails before its timeout is read)
        ctx = ToolContext(
            timeout=command_timeout(command, timeout),
            credentials=credentials or EnvCredentials(),
        )
        data = _run_tool(registry, command, ctx)
        extra: dict[str, Any] | None = None
        if isinstance(data, ToolOutput):
            data, extra = data.data, (data.extra or None)
        dumps(data)  # fail here, with a clear error, rather than in the writer
        returned = returned_failure(data)
        if returned is not None:  # NoETL's rule: a result with status "error"/"failed" fails
            raise ToolError(returned, data=data, extra=extra)
    except ToolError as exc:
        return Outcome.failure(
            exc.message,
            error_type=exc.error_type,
            data=exc.data,
            extra=exc.extra or None,
            duration=took(),
            started_at=started_at,
        )
    except NotSerialisable as exc:
        return Outcome.failure(
            str(exc), error_type="serialisation", duration=took(), started_at=started_at
        )
    except PgWorkerError as exc:
        return Outcome.failure(exc.message, duration=took(), started_at=started_at)
    except BaseException as exc:  # user code may raise anything, SystemExit too
        if isinstance(exc, KeyboardInterrupt):
            raise
        return Outcome.failure(
            f"{type(exc).__name__}: {exc}",
            error_type="exception",
            duration=took(),
            started_at=started_at,
        )
    return Outcome.success(data, duration=took(), started_at=started_at, extra=extra)


def _run_tool(registry: ToolRegistry, command: Command, ctx: ToolContext) -> Any:
    """The tool's output; the command's templates evaluated in the registry's sandbox unless
    they are bounded (:data:`~noetl_pgworker.render.ISOLATE`)."""
    isolated = registry.isolated
    token = ISOLATE.set(isolated.templates(ctx.remaining) if isolated is not None else None)
    try:
        return registry.get(command.tool_kind).run(command, ctx)
    finally:
        ISOLATE.reset(token)


def _log_extra(action: str, command: Command) -> dict[str, Any]:
    return {
        "action": action,
        "command_id": command.command_id,
        "execution_id": str(command.execution_id),
        "step": command.step,
    }


class Outcomes(Protocol):
    """Where the dispatcher hands a command's start and outcome (the reporter)."""

    def started(
        self,
        ref: CommandRef,
        at: datetime,
        *,
        loop_event_id: str | None = None,
        iter_index: int | None = None,
    ) -> None: ...

    def finished(
        self,
        ref: CommandRef,
        outcome: Outcome,
        *,
        loop_event_id: str | None = None,
        iter_index: int | None = None,
    ) -> None: ...


class Dispatcher:
    """Runs commands on ``inflight.concurrency`` named threads."""

    def __init__(
        self,
        registry: ToolRegistry,
        inflight: InFlight,
        outcomes: Outcomes,
        *,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
        credentials: CredentialProvider | None = None,
        prepare: Callable[[Command], Command] | None = None,
        interrupts: Interrupts | None = None,
    ) -> None:
        self._registry = registry
        self._prepare = prepare
        #: running commands' handles: a cancel or the stop's end reaches their processes
        self.interrupts = interrupts or Interrupts()
        self._timeout = timeout
        self._credentials = credentials or EnvCredentials()
        self._inflight = inflight
        self._outcomes = outcomes
        self._executor = ThreadPoolExecutor(
            max_workers=inflight.concurrency, thread_name_prefix="noetl-pgworker-tool"
        )

    def submit(self, command: Command) -> None:
        """Run ``command`` on the thread(s) the caller reserved for it (``inflight.hold``)."""
        try:
            self._executor.submit(self._run, command)
        except BaseException:
            self._inflight.finished(command.ref)
            self._inflight.written(command.ref)
            raise

    def _run(self, command: Command) -> None:
        ref = command.ref
        loop_event_id, iter_index = command.loop_event_id, command.iter_index
        try:
            self._inflight.started(ref)
            self._outcomes.started(
                ref, datetime.now(UTC), loop_event_id=loop_event_id, iter_index=iter_index
            )
            outcome = self._execute(command)
            if not outcome.ok:
                logger.debug(
                    "command failed: %s",
                    outcome.error,
                    extra=_log_extra("command_failed", command),
                )
            # The thread is free before the hand-over: the writer, waking for this outcome,
            # then counts only the commands still running.
            self._inflight.finished(ref)
            self._outcomes.finished(
                ref, outcome, loop_event_id=loop_event_id, iter_index=iter_index
            )
        except Exception:
            # Only the hand-over can get here (execute never raises); keep the thread alive.
            # The claim stays in the database and is recovered after the lease: it no longer
            # counts against this worker's claims.
            self._inflight.written(ref)
            logger.exception(
                "could not hand over the outcome of command %s",
                command.command_id,
                extra=_log_extra("dispatch_error", command),
            )
        finally:
            self._inflight.finished(ref)  # (idempotent)

    def _execute(self, command: Command) -> Outcome:
        with self.interrupts.running(command.command_id) as handle:
            outcome = execute(
                command,
                self._registry,
                timeout=self._timeout,
                credentials=self._credentials,
                prepare=self._prepare,
            )
        if handle.cancelled_by is not None and outcome.error_type != "cancelled":
            # A tool that runs on this thread could not be stopped: it ran to its end, and
            # the command still ends CANCELLED (what it returned is kept beside the error).
            return Outcome.failure(
                f"cancelled by {handle.cancelled_by} (it ran to its end)",
                error_type="cancelled",
                data=outcome.data,
                extra=outcome.extra,
                duration=outcome.duration,
                started_at=outcome.started_at,
            )
        return outcome

    def shutdown(self, timeout: float) -> bool:
        """Stop taking work and wait up to ``timeout`` for running commands; True if all ended."""
        idle = self._inflight.wait_idle(timeout)
        self._executor.shutdown(wait=idle, cancel_futures=True)
        return idle
