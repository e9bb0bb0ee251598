"""In-memory parts for tests and demos: a command source and a sink with a dict for a database.

They implement the same protocols as the PostgreSQL parts (``source.CommandSource``,
``sink.Sink``) and behave like them where a worker can tell: ``tests/integration/
test_conformance.py`` runs the same cases against both. Use them through
``noetl_pgworker.testing``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable

from .errors import ItemRefused, RetryLater
from .models import TERMINAL_STATUSES, Command, CommandRef, CommandStatus
from .sink import DEFAULT_MAX_RESULT_BYTES, Key, WriteItem, pg_rows
from .source import SourceCounts, SourceHooks


class InMemorySource:
    """A queue of commands in a list: claims up to ``1 + free_slots()`` at a time, like
    :class:`~noetl_pgworker.source.PgCommandSource`.

    By default it is finite: ``next()`` returns ``None`` once the queue is empty (drain and
    exit). With ``wait=True`` it waits for :meth:`put` instead, until the worker stops.
    """

    def __init__(
        self,
        commands: Iterable[Command] = (),
        *,
        hooks: SourceHooks | None = None,
        wait: bool = False,
        tool_kinds: Iterable[str] | None = None,
    ) -> None:
        self._pending: collections.deque[Command] = collections.deque(commands)
        self._buffer: collections.deque[Command] = collections.deque()
        self._cond = threading.Condition()
        self._hooks = hooks or SourceHooks()
        self._wait = wait
        self._kinds = frozenset(tool_kinds) if tool_kinds is not None else None
        self.first_claim = threading.Event()
        self.counts = SourceCounts()
        #: Command ids handed out and not yet reported done (``done``).
        self.claimed: set[int] = set()
        self.closed = False

    def bind(self, hooks: SourceHooks) -> InMemorySource:
        """This source, following a worker's hooks (its stop event, free slots, …)."""
        self._hooks = hooks
        return self

    def put(self, command: Command) -> None:
        with self._cond:
            self._pending.append(command)
            self._cond.notify_all()
        self._hooks.wake.set()

    def next(self) -> Command | None:
        while True:
            with self._cond:
                if self._buffer:
                    return self._buffer.popleft()
                if self._hooks.stop.is_set():
                    return None
                self._claim(1 + max(0, self._hooks.free_slots()))
                if self._buffer:
                    continue
                if not self._wait:
                    return None
            self._hooks.tick()
            if self._hooks.wake.wait(0.1):
                self._hooks.wake.clear()

    def _claim(self, limit: int) -> None:
        kept: collections.deque[Command] = collections.deque()
        while self._pending and len(self._buffer) < limit:
            command = self._pending.popleft()
            if self._kinds is not None and command.tool_kind not in self._kinds:
                kept.append(command)
                continue
            self._buffer.append(command)
            self.claimed.add(int(command.command_id))
            self.counts.claimed += 1
        self._pending.extendleft(reversed(kept))
        self.first_claim.set()

    def unread(self, command: Command) -> None:
        with self._cond:
            self._buffer.appendleft(command)

    def buffered(self) -> int:
        with self._cond:
            return len(self._buffer)

    def release_unstarted(self, timeout: float = 10.0) -> int:
        with self._cond:
            released = list(self._buffer)
            self._buffer.clear()
            self._pending.extendleft(reversed(released))
            self.claimed.difference_update(int(c.command_id) for c in released)
            return len(released)

    def done(self, command_ids: Iterable[int]) -> None:
        with self._cond:
            self.claimed.difference_update(command_ids)

    def close(self) -> None:
        self.closed = True

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._buffer)


class InMemorySink:
    """Direct mode's sink with a dict for a database: the rows and events
    :class:`~noetl_pgworker.sink.PgSink` would write, behind the same fence (the claim is this
    worker's, the row is not terminal)."""

    def __init__(
        self,
        worker_id: str = "w1",
        *,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        on_write: Callable[[list[WriteItem]], None] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._max_result_bytes = max_result_bytes
        #: Who holds each command's claim (absent: nobody; a write to it changes nothing).
        self.holders: dict[Key, str] = {}
        self.status: dict[Key, str] = {}
        self.errors: dict[Key, str | None] = {}
        self.events: list[dict[str, object]] = []
        self.calls = 0
        #: The next this many writes fail as if the database were away.
        self.fail_next = 0
        #: A batch holding an outcome for one of these (other than a failure) is refused, as
        #: PostgreSQL refuses a batch with data it cannot store, without saying which item.
        self.refuse: set[Key] = set()
        self._on_write = on_write
        self._lock = threading.Lock()

    def claim(self, ref: CommandRef | Command, worker_id: str | None = None) -> Key:
        """Record a claim (as the claim statement would): CLAIMED by ``worker_id``."""
        ref = ref.ref if isinstance(ref, Command) else ref
        key = (ref.execution_id, ref.command_id)
        with self._lock:
            self.holders[key] = worker_id or self.worker_id
            self.status[key] = CommandStatus.CLAIMED
        return key

    def write(self, items: list[WriteItem]) -> set[Key]:
        if self._on_write is not None:
            self._on_write(items)
        with self._lock:
            self.calls += 1
            if self.fail_next:
                self.fail_next -= 1
                raise RetryLater("server closed the connection unexpectedly (simulated)")
            rows = pg_rows(items, self.worker_id, self._max_result_bytes)
            if any(r.status != CommandStatus.FAILED and _key(r.ref) in self.refuse for r in rows):
                raise ItemRefused("outcome could not be stored: refused (simulated)")
            written: set[Key] = set()
            for row in rows:
                key = _key(row.ref)
                if self.holders.get(key) != self.worker_id:
                    continue
                if self.status.get(key) in TERMINAL_STATUSES:
                    continue
                self.status[key] = row.status
                if row.status == CommandStatus.PENDING:  # given back: unclaimed, as in SQL
                    self.holders.pop(key, None)
                if row.error is not None or row.status != CommandStatus.RUNNING:
                    self.errors[key] = row.error
                self.events += row.events
                written.add(key)
            return written


def _key(ref: CommandRef) -> Key:
    return (ref.execution_id, ref.command_id)
