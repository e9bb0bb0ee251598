"""The real Worker (claim loop, dispatcher, reporter, shutdown) on the in-memory source and sink."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from noetl_pgworker import CommandSource, InFlight, Slots, SourceHooks, Worker
from noetl_pgworker.config import Settings
from noetl_pgworker.dispatcher import Dispatcher
from noetl_pgworker.models import Command, CommandRef, Outcome
from noetl_pgworker.reporter import Reporter
from noetl_pgworker.testing import InMemorySink, InMemorySource
from noetl_pgworker.tools import ToolContext, ToolRegistry, default_registry
from noetl_pgworker.worker import RunSummary

pytestmark = pytest.mark.unit


def make_cmd(i: int, kind: str = "noop", code: str | None = None, attempt: int = 1) -> Command:
    return Command(
        command_id=str(i),
        execution_id=100 + i % 3,
        step=f"s{i}",
        tool_kind=kind,
        catalog_id=1,
        attempt=attempt,
        input={"tool_config": {"code": code} if code else {}},
    )


def sink_for(cmds: list[Command], worker_id: str = "w1") -> InMemorySink:
    sink = InMemorySink(worker_id)
    for c in cmds:
        sink.claim(c)
    return sink


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "worker_id": "w1",
        "concurrency": 4,
        "flush_interval": 0.001,
        "flush_max": 50,
        "drain": True,
        "python_mode": "inline",
        "shutdown_timeout": 10,
    }
    return Settings(**{**values, **overrides})


def worker_for(
    source: InMemorySource,
    sink: InMemorySink,
    registry: ToolRegistry | None = None,
    **overrides: Any,
) -> Worker:
    return Worker(
        settings(**overrides),
        registry or default_registry(python_mode="inline"),
        source=source.bind,
        sink=sink,
    )


def run_all(
    source: InMemorySource, sink: InMemorySink, concurrency: int = 4
) -> tuple[Worker, RunSummary]:
    """The whole worker, no database: drains ``source`` into ``sink``."""
    worker = worker_for(source, sink, concurrency=concurrency)
    summary = worker.run()
    assert summary.unwritten == 0
    return worker, summary


class Recorder:
    """A tool that records how many commands run at once, and which."""

    kind = "rec"

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.now: set[str] = set()
        self.together: dict[str, set[str]] = {}
        self.max_at_once = 0

    def run(self, command: Command, ctx: ToolContext) -> Any:
        with self.lock:
            self.now.add(command.command_id)
            self.max_at_once = max(self.max_at_once, len(self.now))
            for cid in self.now:
                self.together.setdefault(cid, set()).update(self.now - {cid})
        time.sleep(self.seconds)
        with self.lock:
            self.now.discard(command.command_id)
        return {"ok": True}


def test_the_in_memory_source_conforms_to_the_protocol() -> None:
    source = InMemorySource([make_cmd(1)])
    assert isinstance(source, CommandSource)
    assert source.next() is not None
    assert source.next() is None  # exhausted: drain and exit


def test_every_command_ends_once_with_the_full_event_trail() -> None:
    cmds = [make_cmd(i) for i in range(40)] + [
        make_cmd(100, "python", "result = 1/0"),
        make_cmd(101, "nope"),
    ]
    sink = sink_for(cmds)
    worker, summary = run_all(InMemorySource(cmds), sink)
    assert len(sink.status) == 42
    assert sum(1 for s in sink.status.values() if s == "FAILED") == 2
    finals = [e for e in sink.events if e["event_type"] in ("command.completed", "command.failed")]
    assert len(finals) == 42
    started = [e for e in sink.events if e["event_type"] == "command.started"]
    assert len(started) == 42
    assert sink.calls < 42  # batched, not one write per command
    assert (summary.claimed, summary.completed, summary.failed) == (42, 40, 2)
    # Everything held was given back.
    assert worker.inflight.free() == 4 and worker.inflight.claims.in_use() == 0
    assert worker.inflight.held_ids() == []


def test_outcomes_survive_a_database_outage() -> None:
    cmds = [make_cmd(i) for i in range(10)]
    sink = sink_for(cmds)
    sink.fail_next = 3
    worker, _ = run_all(InMemorySource(cmds), sink)
    assert len(sink.status) == 10 and set(sink.status.values()) == {"COMPLETED"}
    assert worker.reporter is not None and worker.reporter.stats.write_errors == 3


def test_a_lost_claim_changes_nothing() -> None:
    cmds = [make_cmd(i) for i in range(4)]
    sink = sink_for(cmds)
    sink.claim(cmds[0], "someone-else")
    _, summary = run_all(InMemorySource(cmds), sink)
    assert sink.status[(cmds[0].execution_id, 0)] == "CLAIMED"  # unchanged
    assert summary.fenced >= 1
    assert all(e["command_id"] != 0 for e in sink.events)


def test_a_row_the_database_refuses_is_stored_as_a_failure_and_others_go_on() -> None:
    cmds = [make_cmd(i) for i in range(5)]
    sink = sink_for(cmds)
    sink.refuse = {(cmds[2].execution_id, 2)}
    run_all(InMemorySource(cmds), sink, concurrency=1)
    assert sink.status[(cmds[2].execution_id, 2)] == "FAILED"
    bad = [e for e in sink.events if e["command_id"] == 2 and e["event_type"] == "command.failed"]
    assert "outcome could not be stored" in str(bad[0]["error"])
    assert sum(1 for s in sink.status.values() if s == "COMPLETED") == 4


def test_an_outcome_that_cannot_be_shaped_fails_alone() -> None:
    ref = CommandRef(execution_id=1, command_id=1, catalog_id=1, step="s")
    other = CommandRef(execution_id=1, command_id=2, catalog_id=1, step="s")
    sink = InMemorySink("w1")
    sink.claim(ref)
    sink.claim(other)
    reporter = Reporter(sink, flush_interval=0.05)
    reporter.finished(ref, Outcome.success({"x": float("nan")}))
    reporter.finished(other, Outcome.success({"x": 1}))
    reporter.start()
    assert reporter.close(5)
    assert sink.status == {(1, 1): "FAILED", (1, 2): "COMPLETED"}
    assert "not JSON-serialisable" in str(sink.errors[(1, 1)])


def test_start_and_finish_fold_into_one_write() -> None:
    ref = CommandRef(execution_id=1, command_id=1, catalog_id=1, step="s")
    sink = InMemorySink("w1")
    sink.claim(ref)
    reporter = Reporter(sink, flush_interval=0.05)
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


def test_a_command_taken_back_runs_alone_and_the_others_go_back_first() -> None:
    tool = Recorder()
    registry = ToolRegistry([tool])
    # Claimed in one batch with three others, and handed out first.
    cmds = [make_cmd(3, "rec", attempt=2)] + [make_cmd(i, "rec") for i in range(8) if i != 3]
    sink = sink_for(cmds)
    source = InMemorySource(cmds)
    released: list[int] = []
    original = source.release_unstarted

    def release(timeout: float = 10.0) -> int:
        n = original(timeout)
        released.append(n)
        return n

    source.release_unstarted = release  # type: ignore[method-assign]
    summary = worker_for(source, sink, registry).run()
    assert summary.completed == 8 and summary.unwritten == 0
    assert tool.together.get("3", set()) == set()  # nothing ran beside the suspect
    assert tool.max_at_once > 1  # the others did run side by side
    assert released[0] == 3  # the ones claimed with it went back first


def test_claims_whose_outcome_is_not_written_count_against_their_own_budget() -> None:
    gate = threading.Event()
    cmds = [make_cmd(i) for i in range(20)]
    sink = InMemorySink("w1", on_write=lambda items: gate.wait(10))
    for c in cmds:
        sink.claim(c)
    source = InMemorySource(cmds)
    worker = worker_for(source, sink, concurrency=2, max_pending_writes=3)
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while source.counts.claimed < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # more claims would come now if the budget let them
        assert source.counts.claimed == 5  # 2 threads + 3 outcomes waiting for their write
        assert worker.inflight.free() == 0
    finally:
        gate.set()
    thread.join(20)
    assert not thread.is_alive()
    assert set(sink.status.values()) == {"COMPLETED"} and len(sink.status) == 20


def test_a_graceful_stop_lets_running_commands_finish_and_writes_every_outcome() -> None:
    tool = Recorder(seconds=0.3)
    cmds = [make_cmd(i, "rec") for i in range(3)]
    sink = sink_for(cmds)
    source = InMemorySource(cmds, wait=True)
    worker = worker_for(source, sink, ToolRegistry([tool]), concurrency=2, drain=False)
    result: list[RunSummary] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    thread.start()
    assert worker.wait_ready(5)
    deadline = time.monotonic() + 5
    while len(tool.now) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    thread.join(20)
    assert not thread.is_alive() and result
    summary = result[0]
    assert summary.unwritten == 0 and summary.completed == 2
    assert len(source) == 1  # never claimed: only what could start now was
    assert source.claimed == set()  # every written outcome gave its claim back (``done``)
    assert source.closed


def test_a_failing_hand_over_gives_back_what_the_command_held() -> None:
    class Broken:
        def started(self, ref: CommandRef, at: datetime, **_: Any) -> None:
            raise RuntimeError("a bug in a callback")

        def finished(self, ref: CommandRef, outcome: Outcome, **_: Any) -> None:
            raise AssertionError("not reached")

    inflight = InFlight(2)
    dispatcher = Dispatcher(default_registry(), inflight, Broken())
    assert inflight.reserve(1)
    assert inflight.take_other_threads(threading.Event()) == 1  # a suspect: every thread
    inflight.hold(make_cmd(1).ref, threads=2)
    assert inflight.free() == 0
    dispatcher.submit(make_cmd(1))
    assert dispatcher.shutdown(5)
    # Both threads and the claim are free again: nothing leaked.
    assert inflight.threads.available() == 2 and inflight.claims.in_use() == 0
    assert inflight.held_ids() == [] and inflight.running_since() == []


def test_source_hooks_default_to_a_worker_that_never_stops() -> None:
    hooks = SourceHooks()
    assert not hooks.stop.is_set() and hooks.free_slots() == 0 and list(hooks.held()) == []


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


def _recording_sink(
    refs: list[CommandRef],
) -> tuple[InMemorySink, list[list[tuple[int, bool, bool]]]]:
    """An in-memory sink that also records each write: (command id, started, has outcome)."""
    sink = InMemorySink("w1")
    for ref in refs:
        sink.claim(ref)
    writes: list[list[tuple[int, bool, bool]]] = []
    original = sink.write

    def write(items: Any) -> Any:
        writes.append([(i.ref.command_id, i.started, i.outcome is not None) for i in items])
        return original(items)

    sink.write = write  # type: ignore[method-assign]
    return sink, writes


def test_a_start_waits_for_the_start_delay_then_is_written_alone() -> None:
    ref = CommandRef(execution_id=1, command_id=1, catalog_id=1, step="s")
    sink, writes = _recording_sink([ref])
    reporter = Reporter(sink, start_delay=0.3)
    reporter.start()
    try:
        reporter.started(ref, datetime.now(UTC))
        time.sleep(0.15)
        assert writes == []  # not yet: the outcome may still come and share the write
        deadline = time.monotonic() + 5
        while not writes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writes == [[(1, True, False)]]
        assert sink.status[(1, 1)] == "RUNNING"
        reporter.finished(ref, Outcome.success({"a": 1}))
    finally:
        assert reporter.close(5)
    assert writes[1:] == [[(1, False, True)]]
    assert sink.status[(1, 1)] == "COMPLETED"


def test_a_command_that_ends_within_the_start_delay_costs_one_write() -> None:
    ref = CommandRef(execution_id=1, command_id=1, catalog_id=1, step="s")
    sink, writes = _recording_sink([ref])
    reporter = Reporter(sink, start_delay=5.0)
    reporter.start()
    try:
        reporter.started(ref, datetime.now(UTC))
        time.sleep(0.05)
        reporter.finished(ref, Outcome.success({"a": 1}))
        assert reporter.flush(5)
    finally:
        assert reporter.close(5)
    assert writes == [[(1, True, True)]]
    assert sink.events[0]["event_type"] == "command.started"


def test_while_others_run_outcomes_are_gathered_into_one_write() -> None:
    refs = [CommandRef(execution_id=1, command_id=i, catalog_id=1, step="s") for i in (1, 2)]
    sink, writes = _recording_sink(refs)
    running = [2]
    reporter = Reporter(sink, gather=2.0, busy=lambda: running[0])
    reporter.start()
    try:
        running[0] = 1
        reporter.finished(refs[0], Outcome.success({"a": 1}))
        time.sleep(0.2)
        assert writes == []  # the other command still runs: its outcome is waited for
        running[0] = 0
        reporter.finished(refs[1], Outcome.success({"a": 2}))
        assert reporter.flush(5)
    finally:
        assert reporter.close(5)
    assert writes == [[(1, False, True), (2, False, True)]]


def test_an_outcome_is_written_at_once_when_nothing_else_runs() -> None:
    ref = CommandRef(execution_id=1, command_id=1, catalog_id=1, step="s")
    sink, writes = _recording_sink([ref])
    reporter = Reporter(sink, gather=30.0, busy=lambda: 0)
    reporter.start()
    try:
        t0 = time.monotonic()
        reporter.finished(ref, Outcome.success({"a": 1}))
        assert reporter.flush(5)
        assert time.monotonic() - t0 < 5  # not the 30 s gather window
    finally:
        assert reporter.close(5)
    assert writes == [[(1, False, True)]]


def test_a_claim_under_load_waits_briefly_for_more_free_threads() -> None:
    inflight = InFlight(4)
    refs = [CommandRef(execution_id=1, command_id=i, catalog_id=1, step="s") for i in range(40)]
    assert inflight.reserve(1)
    # Idle (nothing else runs): no wait, every other thread is free.
    t0 = time.monotonic()
    assert inflight.gathered_free(5.0) == 3
    assert time.monotonic() - t0 < 1
    inflight.unreserve()
    # Three others run; one finishes soon: the claim waits for it (up to the window).
    for ref in refs[:3]:
        assert inflight.reserve(1)
        inflight.hold(ref)
    assert inflight.reserve(1)
    threading.Timer(0.1, inflight.finished, [refs[0]]).start()
    t0 = time.monotonic()
    assert inflight.gathered_free(5.0) == 1
    assert 0.05 < time.monotonic() - t0 < 4
    # Commands that finish seldom (the last gap was long): no wait, even with a window.
    assert inflight.threads.acquire(1)
    t0 = time.monotonic()
    assert inflight.gathered_free(0.3) == 0
    assert time.monotonic() - t0 < 0.2
    # Commands finishing often, but none now: the window bounds the wait.
    for ref in refs[10:30]:
        inflight.hold(ref)  # (its thread is the one just taken, given back at once)
        inflight.finished(ref)
        assert inflight.threads.acquire(1)
    t0 = time.monotonic()
    assert inflight.gathered_free(0.3) == 0
    assert 0.2 < time.monotonic() - t0 < 3


def test_outcomes_are_not_gathered_when_every_claim_waits_for_its_write() -> None:
    inflight = InFlight(2, pending_writes=0)  # two claim slots in all
    refs = [CommandRef(execution_id=1, command_id=i, catalog_id=1, step="s") for i in range(3)]
    for ref in refs[:2]:  # finishing fast: the gap between finishes is small
        assert inflight.reserve(1)
        inflight.hold(ref)
        inflight.finished(ref)
        inflight.written(ref)
    for ref in refs[:2]:
        assert inflight.reserve(1)
        inflight.hold(ref)
    assert inflight.finishing_within(30.0)
    assert not inflight.outcomes_worth_gathering(30.0)  # no claim slot left: write now
    inflight.finished(refs[0])
    inflight.written(refs[0])
    assert inflight.outcomes_worth_gathering(30.0)  # a slot is free, one command still runs


def test_a_claim_takes_ahead_only_what_the_threads_will_soon_run() -> None:
    inflight = InFlight(4, pending_writes=10)
    refs = [CommandRef(execution_id=1, command_id=i, catalog_id=1, step="s") for i in range(40)]
    # Nothing ran yet: nothing ahead, whatever the round trip.
    assert inflight.ahead(1.0) == 0
    # Commands finish about every millisecond: a claim may take ahead what the threads will
    # finish in two round trips, but never more than the free claim slots beyond the threads.
    for ref in refs[:30]:
        assert inflight.reserve(1)
        inflight.hold(ref)
        inflight.finished(ref)
        inflight.written(ref)
        time.sleep(0.001)
    assert inflight.free() == 4
    assert inflight.ahead(1.0) == 10  # 14 claim slots, 4 of them the free threads'
    assert inflight.ahead(0.0) == 0
    # Outcomes awaiting their write hold claim slots: less room ahead.
    for ref in refs[30:36]:
        assert inflight.reserve(1)
        inflight.hold(ref)
        inflight.finished(ref)
    assert inflight.ahead(1.0) == 4
    # A worker that finished nothing lately claims nothing ahead.
    time.sleep(0.3)
    assert inflight.ahead(0.1) == 0


def test_enough_waiting_outcomes_are_written_without_gathering_more() -> None:
    refs = [CommandRef(execution_id=1, command_id=i, catalog_id=1, step="s") for i in (1, 2, 3)]
    sink, writes = _recording_sink(refs)
    # Others still run all along, and the gather window is long: only `enough` ends the wait.
    running = [True]
    reporter = Reporter(sink, gather=30.0, busy=lambda: running[0], enough=2)
    reporter.start()
    try:
        reporter.finished(refs[0], Outcome.success({"a": 1}))
        time.sleep(0.2)
        assert writes == []  # one outcome: the others are waited for
        reporter.finished(refs[1], Outcome.success({"a": 2}))
        deadline = time.monotonic() + 5
        while not writes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writes == [[(1, False, True), (2, False, True)]]  # well within the 30 s
    finally:
        running[0] = False
        reporter.finished(refs[2], Outcome.success({"a": 3}))
        assert reporter.close(5)
