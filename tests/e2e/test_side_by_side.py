"""Our worker and NoETL's own worker on one server: no command may run twice.

Opt-in (``NOETL_E2E_SIDE_BY_SIDE=1``), and NoETL's worker must already be serving the server:
the test starts only ours. 250 executions of a 4-step playbook = 1,000 commands.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

from .conftest import NoetlServer, WorkerProcess

EXECUTIONS = int(os.environ.get("NOETL_E2E_SIDE_BY_SIDE_EXECUTIONS", "250"))


@pytest.mark.timeout(1200)
def test_side_by_side_no_command_runs_twice(
    noetl: NoetlServer, worker: WorkerProcess | None
) -> None:
    assert worker is not None, "side by side needs our worker: unset NOETL_E2E_EXTERNAL_WORKER"
    noetl.register("side_by_side")
    t0 = time.monotonic()
    ids = [int(noetl.start("side_by_side", {"n": i})) for i in range(EXECUTIONS)]
    ended: dict[int, str] = {}
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and len(ended) < len(ids):
        rows = noetl.query(
            "SELECT execution_id, event_type FROM noetl.event WHERE execution_id = ANY(%s)"
            " AND event_type IN ('playbook.completed', 'playbook.failed')",
            (ids,),
        )
        ended = {r["execution_id"]: r["event_type"] for r in rows}
        time.sleep(2)
    took = time.monotonic() - t0

    commands = noetl.query(
        "SELECT command_id, worker_id, status FROM noetl.command WHERE execution_id = ANY(%s)",
        (ids,),
    )
    # Every outcome a worker reported, per command (call.done or call.error).
    outcomes = noetl.query(
        "SELECT COALESCE(command_id, (result->'context'->>'command_id')::bigint) AS command_id,"
        " count(*) AS n FROM noetl.event WHERE execution_id = ANY(%s)"
        " AND event_type IN ('call.done', 'call.error') GROUP BY 1",
        (ids,),
    )
    # Claims per command by distinct workers.
    claims = noetl.query(
        "SELECT COALESCE(command_id, (result->'context'->>'command_id')::bigint) AS command_id,"
        " count(DISTINCT COALESCE(worker_id, meta->>'worker_id')) AS workers"
        " FROM noetl.event WHERE execution_id = ANY(%s) AND event_type = 'command.claimed'"
        " GROUP BY 1",
        (ids,),
    )
    twice = [r for r in outcomes if r["n"] > 1]
    double_claimed = [r for r in claims if r["workers"] > 1]
    by_worker = Counter(
        "ours" if c["worker_id"] == worker.worker_id else (c["worker_id"] or "-") for c in commands
    )
    statuses = Counter(c["status"] for c in commands)
    completed = sum(1 for t in ended.values() if t == "playbook.completed")
    print(
        f"\nside by side: {len(ids)} executions, {len(commands)} commands in {took:.0f}s;"
        f" completed {completed}, failed {len(ended) - completed},"
        f" not ended {len(ids) - len(ended)}; commands by worker {dict(by_worker)};"
        f" statuses {dict(statuses)}; commands reported twice: {len(twice)};"
        f" claimed by two workers: {len(double_claimed)}"
    )
    assert not twice, f"{len(twice)} commands reported twice, e.g. {twice[:5]}"
    assert not double_claimed, f"{len(double_claimed)} claimed by two workers: {double_claimed[:5]}"
    assert len(ended) == len(ids) and completed == len(ids)
    assert len(commands) == 4 * len(ids)
    assert by_worker["ours"] > 0, "our worker ran nothing"
    assert len(by_worker) > 1, "only our worker ran commands: is NoETL's worker running?"
