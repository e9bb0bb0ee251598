"""Where outcomes go: the :class:`Sink` protocol, what the reporter hands it, the direct sink.

The reporter hands a sink :class:`WriteItem` s: a command's start (when not yet written) and/or
its outcome, nothing shaped. Each sink turns them into what it writes (direct mode: row updates
and ``noetl.event`` rows, here; server mode: NoETL's HTTP events, ``server.HttpSink``) and
raises only the package's errors: :class:`~noetl_pgworker.errors.RetryLater` (keep the items,
write them later) or :class:`~noetl_pgworker.errors.ItemRefused` (this outcome cannot be
stored; the reporter stores a failure saying why instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from psycopg_pool import ConnectionPool

from . import events
from .db import write_errors
from .errors import ItemRefused
from .jsontext import NotSerialisable, clean_text, dumps
from .models import CommandRef, CommandStatus, Outcome
from .queries import query

Key = tuple[int, int]  # (execution_id, command_id)
T = TypeVar("T")

#: Above this, a row's ``result`` is a summary (``--max-result-bytes``).
DEFAULT_MAX_RESULT_BYTES = 1024 * 1024


#: A failed outcome's error_type that ends the command otherwise than FAILED.
ENDED_BY = {"cancelled": CommandStatus.CANCELLED, "interrupted": CommandStatus.PENDING}


@dataclass(frozen=True, slots=True)
class WriteItem:
    """What a sink is told about one command: its start, its outcome, or both."""

    ref: CommandRef
    started_at: datetime | None = None
    #: The start is not written yet: say it (``command.started``) with this item.
    started: bool = False
    outcome: Outcome | None = None
    loop_event_id: str | None = None
    iter_index: int | None = None
    #: Already made terminal by this worker in SQL (a poison command): report it, do not fence.
    unfenced: bool = False

    @property
    def key(self) -> Key:
        return (self.ref.execution_id, self.ref.command_id)

    @property
    def status(self) -> CommandStatus:
        """RUNNING (a start alone), COMPLETED, FAILED, CANCELLED (``noetl-pgworker cancel``),
        or PENDING: interrupted by the worker's stop, the command goes back to the queue."""
        if self.outcome is None:
            return CommandStatus.RUNNING
        if self.outcome.ok:
            return CommandStatus.COMPLETED
        return ENDED_BY.get(self.outcome.error_type or "", CommandStatus.FAILED)


class Sink(Protocol):
    """Where outcomes go.

    ``write`` returns the keys of the items it wrote; an item left out was refused by the fence
    (the claim is no longer this worker's, or the row is already terminal) and changed nothing.
    It raises :class:`RetryLater` (nothing against the items; ``written`` says what did go
    through) or :class:`ItemRefused` (``key`` names the item when the sink knows it).
    """

    def write(self, items: list[WriteItem]) -> set[Key]: ...


def shape(item: WriteItem, build: Callable[[WriteItem], T]) -> T:
    """``build(item)``, with any failure to shape it turned into :class:`ItemRefused` for it."""
    try:
        return build(item)
    except NotSerialisable as exc:
        raise ItemRefused(str(exc), key=item.key, error_type="serialisation") from exc
    except Exception as exc:  # one outcome that cannot be shaped fails alone
        raise ItemRefused(
            clean_text(f"the outcome could not be stored: {type(exc).__name__}: {exc}")
            or "the outcome could not be stored",
            key=item.key,
            error_type="serialisation",
        ) from exc


@dataclass(frozen=True, slots=True)
class PgRow:
    """Direct mode: one command's row update and the ``noetl.event`` rows that go with it."""

    ref: CommandRef
    status: str
    started_at: datetime | None
    result: dict[str, Any] | None
    error: str | None
    events: list[dict[str, Any]]


def pg_row(item: WriteItem, worker_id: str, max_result_bytes: int) -> PgRow:
    """The row update and events of ``item`` (raises if its outcome cannot be stored)."""
    ref = item.ref
    evs = [events.started_event(ref, worker_id)] if item.started else []
    outcome = item.outcome
    if outcome is None:
        return PgRow(ref, item.status, item.started_at, None, None, evs)
    if item.status == CommandStatus.PENDING:  # given back: nothing of this run is kept
        return PgRow(ref, item.status, None, None, None, [])
    result = events.row_result(ref, outcome, worker_id, max_result_bytes)
    if item.status == CommandStatus.CANCELLED:
        evs.append(events.cancelled_event(ref, outcome, worker_id, result))
        return PgRow(ref, item.status, item.started_at, result, clean_text(outcome.error), evs)
    evs += events.finished_events(
        ref,
        outcome,
        worker_id,
        loop_event_id=item.loop_event_id,
        iter_index=item.iter_index,
        row_limit=max_result_bytes,
    )
    return PgRow(ref, item.status, item.started_at, result, clean_text(outcome.error), evs)


def pg_rows(items: list[WriteItem], worker_id: str, max_result_bytes: int) -> list[PgRow]:
    return [shape(i, lambda i: pg_row(i, worker_id, max_result_bytes)) for i in items]


def write_back_params(rows: list[PgRow], worker_id: str) -> dict[str, Any]:
    """The parameters of the ``write_back`` statement for a batch."""
    return {
        "items": dumps(
            [
                {
                    "execution_id": r.ref.execution_id,
                    "command_id": r.ref.command_id,
                    "status": r.status,
                    "started_at": r.started_at.isoformat() if r.started_at else None,
                    "result": r.result,
                    "error": r.error,
                }
                for r in rows
            ]
        ),
        "events": dumps([e for r in rows for e in r.events]),
        "worker_id": worker_id,
        "execution_ids": sorted({r.ref.execution_id for r in rows}),
        "command_ids": [r.ref.command_id for r in rows],
    }


class PgSink:
    """Direct mode: row status and events written to PostgreSQL in one statement, fenced on
    the worker id and a non-terminal status."""

    def __init__(
        self,
        pool: ConnectionPool[Any],
        worker_id: str,
        *,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._max_result_bytes = max_result_bytes

    def write(self, items: list[WriteItem]) -> set[Key]:
        params = write_back_params(
            pg_rows(items, self._worker_id, self._max_result_bytes), self._worker_id
        )
        with write_errors(), self._pool.connection(timeout=10) as conn:
            # One statement, atomic by itself: no BEGIN and COMMIT round trips around it.
            conn.autocommit = True
            try:
                rows = conn.execute(query("write_back"), params).fetchall()
            finally:
                if not conn.closed:
                    conn.autocommit = False
            return {(int(r[0]), int(r[1])) for r in rows}
