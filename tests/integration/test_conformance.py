"""The same cases against the in-memory parts and the PostgreSQL ones.

The unit tier drives the real Worker on ``InMemorySource`` and ``InMemorySink``; these cases
keep them honest: whatever a worker can tell about a source or a sink, both behave alike.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from noetl_pgworker import CommandSource, ItemRefused, Sink, SourceHooks
from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.models import Command, CommandRef, Outcome
from noetl_pgworker.sink import PgSink, WriteItem
from noetl_pgworker.source import ClaimOptions, PgCommandSource
from noetl_pgworker.testing import InMemorySink, InMemorySource

pytestmark = pytest.mark.integration

KINDS = ("noop", "python")
_ids = itertools.count(1)


# -- sources -----------------------------------------------------------------------------------


class MemorySourceKit:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    def add(self, count: int, kind: str = "noop") -> None:
        for _ in range(count):
            i = next(_ids)
            self.commands.append(
                Command(
                    command_id=str(i), execution_id=7, step=f"s{i}", tool_kind=kind, catalog_id=1
                )
            )

    def source(self, hooks: SourceHooks, kinds: tuple[str, ...] = KINDS) -> CommandSource:
        self._source = InMemorySource(self.commands, hooks=hooks, tool_kinds=kinds)
        return self._source

    def pending(self) -> int:
        return len(self._source) - self._source.buffered()


class PgSourceKit:
    def __init__(self, pool: ConnectionPool[Any], conn: psycopg.Connection[Any]) -> None:
        self.pool, self.conn = pool, conn

    def add(self, count: int, kind: str = "noop") -> None:
        enqueue(self.conn, tool_kind=kind, count=count)

    def source(self, hooks: SourceHooks, kinds: tuple[str, ...] = KINDS) -> CommandSource:
        return PgCommandSource(
            self.pool,
            worker_id="w1",
            tool_kinds=kinds,
            hooks=SourceHooks(
                free_slots=hooks.free_slots, wake=hooks.wake, stop=hooks.stop, held=hooks.held
            ),
            options=ClaimOptions(drain=True),
        )

    def pending(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM noetl.command WHERE status = 'PENDING'"
        ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as p:
        yield p


@pytest.fixture(params=["memory", "postgres"])
def kit(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemorySourceKit()
    pool = request.getfixturevalue("pool")
    return PgSourceKit(pool, request.getfixturevalue("conn"))


def hooks(free: int = 0) -> SourceHooks:
    return SourceHooks(free_slots=lambda: free)


def test_a_source_is_a_command_source(kit: Any) -> None:
    assert isinstance(kit.source(hooks()), CommandSource)


def test_each_command_is_handed_out_once_then_none_when_drained(kit: Any) -> None:
    kit.add(5)
    source = kit.source(hooks(free=10))
    got = []
    while (command := source.next()) is not None:
        got.append(command.command_id)
    assert len(got) == len(set(got)) == 5
    assert source.counts.claimed == 5 and source.first_claim.is_set()
    source.close()


def test_a_claim_takes_at_most_one_plus_the_free_slots(kit: Any) -> None:
    kit.add(5)
    source = kit.source(hooks(free=2))
    assert source.next() is not None
    assert source.buffered() == 2 and source.counts.claimed == 3
    assert kit.pending() == 2
    source.close()


def test_release_unstarted_puts_the_buffer_back(kit: Any) -> None:
    kit.add(5)
    source = kit.source(hooks(free=2))
    assert source.next() is not None
    assert source.release_unstarted(timeout=5) == 2
    assert source.buffered() == 0 and source.release_unstarted(timeout=5) == 0
    assert kit.pending() == 4
    source.close()


def test_unread_hands_the_command_out_again_first(kit: Any) -> None:
    kit.add(2)
    source = kit.source(hooks(free=1))
    first = source.next()
    assert first is not None
    source.unread(first)
    assert source.buffered() == 2
    again = source.next()
    assert again is not None and again.command_id == first.command_id
    source.close()


def test_a_stopped_source_claims_nothing(kit: Any) -> None:
    kit.add(2)
    stopped = SourceHooks(stop=threading.Event())
    stopped.stop.set()
    source = kit.source(stopped)
    assert source.next() is None and source.counts.claimed == 0
    assert kit.pending() == 2
    source.close()


def test_only_the_configured_kinds_are_claimed(kit: Any) -> None:
    kit.add(2, "noop")
    kit.add(2, "python")
    source = kit.source(hooks(free=10), kinds=("python",))
    got = []
    while (command := source.next()) is not None:
        got.append(command.tool_kind)
    assert got == ["python", "python"]
    source.close()


def test_done_and_close_are_accepted_twice(kit: Any) -> None:
    kit.add(1)
    source = kit.source(hooks())
    command = source.next()
    assert command is not None
    source.done([int(command.command_id)])
    source.done([int(command.command_id)])
    source.close()
    source.close()


# -- sinks -------------------------------------------------------------------------------------


class MemorySinkKit:
    def __init__(self) -> None:
        self.sink = InMemorySink("w1")

    def claimed(self, worker_id: str = "w1") -> CommandRef:
        ref = CommandRef(
            execution_id=7, command_id=next(_ids), catalog_id=1, step="s", tool_kind="noop"
        )
        self.sink.claim(ref, worker_id)
        return ref

    def status(self, ref: CommandRef) -> str:
        return self.sink.status[(ref.execution_id, ref.command_id)]

    def events(self, ref: CommandRef) -> list[str]:
        return [str(e["event_type"]) for e in self.sink.events if e["command_id"] == ref.command_id]


class PgSinkKit:
    def __init__(self, pool: ConnectionPool[Any], conn: psycopg.Connection[Any]) -> None:
        self.pool, self.conn = pool, conn
        self.sink = PgSink(pool, "w1")

    def claimed(self, worker_id: str = "w1") -> CommandRef:
        enqueue(self.conn, tool_kind="noop")
        source = PgCommandSource(
            self.pool,
            worker_id=worker_id,
            tool_kinds=("noop",),
        )
        (command,) = source.claim(1)
        source.close()
        return command.ref

    def status(self, ref: CommandRef) -> str:
        row = self.conn.execute(
            "SELECT status FROM noetl.command WHERE command_id = %s", (ref.command_id,)
        ).fetchone()
        assert row is not None
        return str(row[0])

    def events(self, ref: CommandRef) -> list[str]:
        rows = self.conn.execute(
            "SELECT event_type FROM noetl.event WHERE command_id = %s"
            " AND event_type NOT IN ('command.issued', 'command.claimed') ORDER BY event_id",
            (ref.command_id,),
        ).fetchall()
        return [str(r[0]) for r in rows]


@pytest.fixture(params=["memory", "postgres"])
def sinks(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemorySinkKit()
    return PgSinkKit(request.getfixturevalue("pool"), request.getfixturevalue("conn"))


def test_a_sink_is_a_sink(sinks: Any) -> None:
    sink: Sink = sinks.sink
    assert callable(sink.write)


def test_an_outcome_is_written_with_its_event_trail(sinks: Any) -> None:
    ref = sinks.claimed()
    item = WriteItem(ref, started=True, outcome=Outcome.success({"x": 1}))
    assert sinks.sink.write([item]) == {item.key}
    assert sinks.status(ref) == "COMPLETED"
    assert sinks.events(ref) == ["command.started", "call.done", "step.exit", "command.completed"]


def test_a_start_then_a_failure(sinks: Any) -> None:
    ref = sinks.claimed()
    assert sinks.sink.write([WriteItem(ref, started=True)]) == {(ref.execution_id, ref.command_id)}
    assert sinks.status(ref) == "RUNNING"
    failure = WriteItem(ref, outcome=Outcome.failure("boom"))
    assert sinks.sink.write([failure]) == {failure.key}
    assert sinks.status(ref) == "FAILED"
    assert sinks.events(ref) == ["command.started", "call.error", "step.exit", "command.failed"]


def test_a_claim_held_by_another_worker_is_fenced(sinks: Any) -> None:
    ref = sinks.claimed("w2")
    assert sinks.sink.write([WriteItem(ref, outcome=Outcome.success(1))]) == set()
    assert sinks.status(ref) == "CLAIMED" and sinks.events(ref) == []


def test_a_terminal_row_is_never_moved(sinks: Any) -> None:
    ref = sinks.claimed()
    done = WriteItem(ref, outcome=Outcome.success(1))
    assert sinks.sink.write([done]) == {done.key}
    assert sinks.sink.write([WriteItem(ref, outcome=Outcome.failure("late"))]) == set()
    assert sinks.status(ref) == "COMPLETED"


def test_an_outcome_that_cannot_be_stored_is_refused_by_name(sinks: Any) -> None:
    ref, other = sinks.claimed(), sinks.claimed()
    bad = WriteItem(ref, outcome=Outcome.success({"x": float("nan")}))
    with pytest.raises(ItemRefused) as info:
        sinks.sink.write([WriteItem(other, outcome=Outcome.success(1)), bad])
    assert info.value.key == bad.key and info.value.error_type == "serialisation"
    assert sinks.status(other) == "CLAIMED"  # nothing of the batch was written


def test_a_cancelled_run_ends_cancelled(sinks: Any) -> None:
    ref = sinks.claimed()
    item = WriteItem(ref, started=True, outcome=Outcome.failure("x", error_type="cancelled"))
    assert sinks.sink.write([item]) == {item.key}
    assert sinks.status(ref) == "CANCELLED"
    assert sinks.events(ref) == ["command.started", "command.cancelled"]


def test_an_interrupted_run_goes_back_to_the_queue_unclaimed(sinks: Any) -> None:
    ref = sinks.claimed()
    item = WriteItem(ref, started=True, outcome=Outcome.failure("y", error_type="interrupted"))
    assert sinks.sink.write([item]) == {item.key}
    assert sinks.status(ref) == "PENDING" and sinks.events(ref) == []
    # unclaimed: a late write of the run that was given back changes nothing
    assert sinks.sink.write([WriteItem(ref, outcome=Outcome.success(1))]) == set()
