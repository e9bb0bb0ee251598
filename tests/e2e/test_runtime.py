"""Cancelling a running execution, and 100 executions at once."""

from __future__ import annotations

import time

import pytest

from .conftest import PATH_PREFIX, NoetlServer, WorkerProcess


def test_cancel_mid_run(noetl: NoetlServer, worker: WorkerProcess | None) -> None:
    eid = noetl.start("cancel", {"seconds": 8})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = noetl.query(
            "SELECT status FROM noetl.command WHERE execution_id = %s AND step_name = 'slow'",
            (int(eid),),
        )
        if rows and rows[0]["status"] in ("CLAIMED", "RUNNING"):
            break
        time.sleep(0.2)
    else:
        pytest.fail(noetl.snapshot(eid, None).describe())
    answer = noetl.cancel(eid)
    assert answer["status"] == "cancelled", answer
    # the slow step ends (its worker does not stop it); then nothing may follow it
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        rows = noetl.query(
            "SELECT status FROM noetl.command WHERE execution_id = %s AND step_name = 'slow'",
            (int(eid),),
        )
        if rows[0]["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.25)
    time.sleep(3)
    ex = noetl.snapshot(eid, noetl.terminal_event(eid), path=f"{PATH_PREFIX}/cancel")
    types = [e["event_type"] for e in ex.events]
    assert "execution.cancelled" in types, ex.describe()
    # The engine still issues the next step when the cancelled step reports (NoETL's own
    # worker: the same); no worker may run it.
    after = [c for c in ex.commands if c["step_name"] == "after"]
    assert all(c["status"] in ("PENDING", "CANCELLED") for c in after), ex.describe()
    assert not ex.done("after"), ex.describe()
    assert ex.terminal != "playbook.completed", ex.describe()
    slow = [c for c in ex.commands if c["step_name"] == "slow"]
    assert slow[0]["status"] in ("COMPLETED", "FAILED", "CANCELLED"), ex.describe()


@pytest.mark.timeout(420)
def test_hundred_executions_at_once(noetl: NoetlServer, worker: WorkerProcess | None) -> None:
    noetl.register("python_chain")
    t0 = time.monotonic()
    ids = [noetl.start("python_chain", {"base": i}) for i in range(100)]
    started = time.monotonic() - t0
    ended: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(ended) < len(ids):
        rows = noetl.query(
            "SELECT execution_id, event_type FROM noetl.event WHERE execution_id = ANY(%s)"
            " AND event_type IN ('playbook.completed', 'playbook.failed')",
            ([int(i) for i in ids],),
        )
        ended = {str(r["execution_id"]): r["event_type"] for r in rows}
        time.sleep(1)
    took = time.monotonic() - t0
    missing = [i for i in ids if i not in ended]
    failed = [i for i, t in ended.items() if t != "playbook.completed"]
    detail = ""
    for eid in (missing + failed)[:2]:
        detail += noetl.snapshot(eid, ended.get(eid)).describe() + "\n"
    print(f"100 executions: submitted in {started:.1f}s, ended in {took:.1f}s")
    assert not missing and not failed, (
        f"{len(missing)} not ended, {len(failed)} failed after {took:.0f}s\n{detail}"
    )
    # every result is right
    rows = noetl.query(
        "SELECT e.execution_id, (e.result->'context'->>'y')::int AS y FROM noetl.event e"
        " WHERE e.execution_id = ANY(%s) AND e.event_type = 'call.done'"
        " AND e.node_name = 'consume'",
        ([int(i) for i in ids],),
    )
    got = {str(r["execution_id"]): r["y"] for r in rows}
    assert got == {eid: (i + 1) * 2 for i, eid in enumerate(ids)}
