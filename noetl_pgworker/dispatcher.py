"""The dispatcher: a fixed thread pool, slots taken before a claim, tools run by kind.

A slot is a thread. The claim loop reserves one *before* it claims, and claims at most as
many commands as there are free slots, so every claimed command starts at once. The slot is
given back when the tool is done and its outcome handed to the reporter (``on_finish``): the
thread can take the next command while the outcome is being written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from .credentials import CredentialProvider, EnvCredentials
from .errors import PgWorkerError, ToolError
from .jsontext import NotSerialisable, dumps
from .models import Command, Outcome, ToolOutput
from .tools import DEFAULT_COMMAND_TIMEOUT, ToolContext, ToolRegistry, command_timeout

logger = logging.getLogger(__name__)


class Slots:
    """A counter of free threads, with waits that time out."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("at least one slot is needed")
        self.total = total
        self._free = total
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> bool:
        """Take one slot; False if none freed up within ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free > 0, timeout=timeout):
                return False
            self._free -= 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._free >= self.total:
                raise RuntimeError("slot released twice")
            self._free += 1
            self._cond.notify()

    def available(self) -> int:
        with self._cond:
            return self._free

    def in_use(self) -> int:
        with self._cond:
            return self.total - self._free

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every slot is free; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._free == self.total, timeout=timeout)


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
        tool = registry.get(command.tool_kind)
        ctx = ToolContext(
            timeout=command_timeout(command, timeout),
            credentials=credentials or EnvCredentials(),
        )
        data = tool.run(command, ctx)
        extra: dict[str, Any] | None = None
        if isinstance(data, ToolOutput):
            data, extra = data.data, (data.extra or None)
        dumps(data)  # fail here, with a clear error, rather than in the writer
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


def _log_extra(action: str, command: Command) -> dict[str, Any]:
    return {
        "action": action,
        "command_id": command.command_id,
        "execution_id": str(command.execution_id),
        "step": command.step,
    }


class Dispatcher:
    """Runs commands on ``slots.total`` named threads."""

    def __init__(
        self,
        registry: ToolRegistry,
        slots: Slots,
        *,
        on_start: Callable[[Command, datetime], None],
        on_finish: Callable[[Command, Outcome], None],
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
        credentials: CredentialProvider | None = None,
        prepare: Callable[[Command], Command] | None = None,
    ) -> None:
        self._registry = registry
        self._prepare = prepare
        self._timeout = timeout
        self._credentials = credentials or EnvCredentials()
        self._slots = slots
        self._on_start = on_start
        self._on_finish = on_finish
        self._executor = ThreadPoolExecutor(
            max_workers=slots.total, thread_name_prefix="noetl-pgworker-tool"
        )

    def submit(self, command: Command) -> None:
        """Run ``command``. The caller holds a slot for it; ``on_finish`` must release it
        (the dispatcher does, if handing over fails)."""
        self._executor.submit(self._run, command)

    def _run(self, command: Command) -> None:
        try:
            self._on_start(command, datetime.now(UTC))
            outcome = execute(
                command,
                self._registry,
                timeout=self._timeout,
                credentials=self._credentials,
                prepare=self._prepare,
            )
            if not outcome.ok:
                logger.debug(
                    "command failed: %s",
                    outcome.error,
                    extra=_log_extra("command_failed", command),
                )
            self._on_finish(command, outcome)
        except Exception:
            # Only the callbacks can get here (execute never raises); keep the thread alive.
            # The claim stays in the database and is recovered after the lease.
            self._slots.release()
            logger.exception(
                "could not hand over the outcome of command %s",
                command.command_id,
                extra=_log_extra("dispatch_error", command),
            )

    def shutdown(self, timeout: float) -> bool:
        """Stop taking work and wait up to ``timeout`` for running commands; True if all ended."""
        idle = self._slots.wait_idle(timeout)
        self._executor.shutdown(wait=idle, cancel_futures=True)
        return idle
