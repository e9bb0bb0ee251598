"""The dispatcher and the reporter with the in-memory source and an in-memory sink."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import psycopg
import pytest

from noetl_pgworker import CommandSource, InMemorySource
from noetl_pgworker.dispatcher import Dispatcher, Slots
from noetl_pgworker.models import Command, CommandRef, Outcome
from noetl_pgworker.reporter import Key, Reporter, WriteItem
from noetl_pgworker.tools import default_registry

pytestmark = pytest.mark.unit


class MemorySink:
    """Keeps rows in a dict and applies the same fence as the SQL: holder and non-terminal."""

    def __init__(self, holders: dict[Key, str], worker_id: str) -> None:
        self.holders = holders
        self.worker_id = worker_id
        self.rows: dict[Key, str] = {}
        self.events: list[dict] = []
        self.calls = 0
        self.fail_next = 0
        self.refuse: set[Key] = set()
        self.lock = threading.Lock()

    def write(self, items: list[WriteItem]) -> set[Key]:
        with self.lock:
            self.calls += 1
            if self.fail_next:
                self.fail_next -= 1
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            if any(i.key in self.refuse and i.status != "FAILED" for i in items):
                raise psycopg.errors.DataError("unsupported Unicode escape sequence")
            written = set()
            for item in items:
                if self.holders.get(item.key) != self.worker_id:
                    continue
                if self.rows.get(item.key) in ("COMPLETED", "FAILED", "CANCELLED"):
                    continue
                self.rows[item.key] = item.status
                self.events += item.events
                written.add(item.key)
            return written


def make_cmd(i: int, kind: str = "noop", code: str | None = None) -> Command:
    return Command(
        command_id=str(i),
        execution_id=100 + i % 3,
        step=f"s{i}",
        tool_kind=kind,
        catalog_id=1,
        input={"tool_config": {"code": code} if code else {}},
    )


def run_all(source: InMemorySource, sink: MemorySink, concurrency: int = 4) -> Reporter:
    slots = Slots(concurrency)
    reporter = Reporter(sink, "w1", flush_interval=0.001, flush_max=50)
    reporter.start()

    def finish(command: Command, outcome: Outcome) -> None:
        reporter.finished(command.ref, outcome)
        slots.release()

    dispatcher = Dispatcher(
        default_registry(),
        slots,
        on_start=lambda c, at: reporter.started(c.ref, at),
        on_finish=finish,
    )
    while True:
        assert slots.acquire(timeout=5)
        command = source.next()
        if command is None:
            slots.release()
            break
        dispatcher.submit(command)
    assert dispatcher.shutdown(10)
    assert reporter.close(10)
    return reporter


def test_in_memory_source_conforms_to_the_protocol() -> None:
    source = InMemorySource([make_cmd(1)])
    assert isinstance(source, CommandSource)
    assert source.next() is not None
    assert source.next() is None  # exhausted: drain and exit


def test_every_command_ends_once_with_the_full_event_trail() -> None:
    cmds = [make_cmd(i) for i in range(40)] + [
        make_cmd(100, "python", "result = 1/0"),
        make_cmd(101, "nope"),
    ]
    holders = {(c.execution_id, int(c.command_id)): "w1" for c in cmds}
    sink = MemorySink(holders, "w1")
    reporter = run_all(InMemorySource(cmds), sink)
    assert len(sink.rows) == 42
    assert sum(1 for s in sink.rows.values() if s == "FAILED") == 2
    finals = [e for e in sink.events if e["event_type"] in ("command.completed", "command.failed")]
    assert len(finals) == 42
    started = [e for e in sink.events if e["event_type"] == "command.started"]
    assert len(started) == 42
    assert sink.calls < 42  # batched, not one write per command
    assert reporter.stats.written == 42


def test_outcomes_survive_a_database_outage() -> None:
    cmds = [make_cmd(i) for i in range(10)]
    sink = MemorySink({(c.execution_id, int(c.command_id)): "w1" for c in cmds}, "w1")
    sink.fail_next = 3
    reporter = run_all(InMemorySource(cmds), sink)
    assert len(sink.rows) == 10 and set(sink.rows.values()) == {"COMPLETED"}
    assert reporter.stats.write_errors == 3


def test_a_lost_claim_changes_nothing() -> None:
    cmds = [make_cmd(i) for i in range(4)]
    holders = {(c.execution_id, int(c.command_id)): "w1" for c in cmds}
    holders[(cmds[0].execution_id, 0)] = "someone-else"
    sink = MemorySink(holders, "w1")
    reporter = run_all(InMemorySource(cmds), sink)
    assert (cmds[0].execution_id, 0) not in sink.rows
    assert reporter.stats.fenced >= 1
    assert all(e["command_id"] != 0 for e in sink.events)


def test_a_row_the_database_refuses_is_stored_as_a_failure_and_others_go_on() -> None:
    cmds = [make_cmd(i) for i in range(5)]
    sink = MemorySink({(c.execution_id, int(c.command_id)): "w1" for c in cmds}, "w1")
    sink.refuse = {(cmds[2].execution_id, 2)}
    run_all(InMemorySource(cmds), sink, concurrency=1)
    assert sink.rows[(cmds[2].execution_id, 2)] == "FAILED"
    bad = [e for e in sink.events if e["command_id"] == 2 and e["event_type"] == "command.failed"]
    assert "outcome could not be stored" in bad[0]["error"]
    assert sum(1 for s in sink.rows.values() if s == "COMPLETED") == 4


def test_start_and_finish_fold_into_one_write() -> None:
    ref = CommandRef(execution_id=1, command_id=1, catalog_id=1, step="s")
    sink = MemorySink({(1, 1): "w1"}, "w1")
    reporter = Reporter(sink, "w1", flush_interval=0.05)
    reporter.started(ref, datetime.now(UTC))
    reporter.finished(ref, Outcome.success({"a": 1}))
    reporter.start()
    assert reporter.close(5)
    assert sink.calls == 1
    assert [e["event_type"] for e in sink.events] == [
        "command.started",
        "call.done",
        "step.exit",
        "command.completed",
    ]


def test_slots_count_and_time_out() -> None:
    slots = Slots(2)
    assert slots.acquire(0.01) and slots.acquire(0.01)
    assert not slots.acquire(0.01)
    assert slots.available() == 0 and slots.in_use() == 2
    slots.release()
    assert slots.available() == 1
    slots.release()
    with pytest.raises(RuntimeError):
        slots.release()
    assert slots.wait_idle(0.01)
