"""Silent partitions between the worker (in its namespace) and PostgreSQL.

Each scenario measures what an operator waits for: the time from the heal to the worker's
next piece of work, or from SIGTERM to the process's exit; the figures are printed at the end
of the run (``fault figures``). Partitions are shortened where the scenario allows it (the
worker's liveness options are short, ``FAST``), and said so in each test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue

from ..helpers import scalar, table_check
from .conftest import FaultDb, Net, Workers, report

pytestmark = pytest.mark.fault

#: How long any wait of this tier lasts at most (seconds).
PATIENCE = 120.0
#: The bound this tier holds the worker to: back at work within this long after a heal.
BACK_TO_WORK = 10.0
#: SIGTERM → exit may take --shutdown-timeout plus this much (see the README's guarantees).
STOP_MARGIN = 15.0
#: The idle partition's length: shortened from the minutes of a real outage; longer runs
#: (NOETL_PGWORKER_FAULT_IDLE=600) show the same bound at the cost of the tier's time.
IDLE_PARTITION = float(os.environ.get("NOETL_PGWORKER_FAULT_IDLE", "60"))


def sleepy(seconds: float) -> dict[str, Any]:
    return {"code": f"import time\ntime.sleep({seconds})\nresult = 1"}


def waited(predicate: Callable[[], bool], timeout: float = PATIENCE) -> float | None:
    """Seconds until ``predicate`` held, or None if it did not within ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def claimed_by(conn: psycopg.Connection[Any], worker_id: str, step: str) -> int:
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM noetl.command WHERE step_name = %s AND worker_id = %s"
            " AND status <> 'PENDING'",
            (step, worker_id),
        )
    )


def count(conn: psycopg.Connection[Any], where: str, params: Any = None) -> int:
    return int(scalar(conn, f"SELECT count(*) FROM noetl.command WHERE {where}", params))


def terminal(conn: psycopg.Connection[Any]) -> int:
    return count(conn, "status IN ('COMPLETED', 'FAILED', 'CANCELLED')")


def probe(conn: psycopg.Connection[Any], n: int = 3) -> None:
    """Commands of a kind only the worker in the namespace claims (``noop``)."""
    enqueue(conn, tool_kind="noop", step="probe", count=n)


@pytest.mark.timeout(600)
def test_partition_mid_drain_with_a_second_worker(
    fault_db: FaultDb, net: Net, workers: Workers
) -> None:
    """A 60 s partition while two workers drain: the one cut off comes back to work within
    10 s of the heal; the other takes its claims back meanwhile; nothing runs twice to its
    end, nothing is lost."""
    with psycopg.connect(fault_db.dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="python", tool_config=sleepy(0.05), count=1500, executions=20)
        inline = ("--concurrency", "4", "--python-mode", "inline")
        workers.start(fault_db.net_dsn, "ns", *inline, "--tool-kinds", "python,noop")
        workers.start(fault_db.dsn, "root", *inline, "--tool-kinds", "python", in_ns=False)
        assert waited(lambda: count(conn, "worker_id = 'ns' AND status = 'COMPLETED'") >= 20)
        net.partition()
        time.sleep(60)
        net.heal()
        probe(conn)
        back = waited(lambda: claimed_by(conn, "ns", "probe") > 0)
        drained = waited(lambda: terminal(conn) == 1503, PATIENCE * 2)
        figures = table_check(conn, 1503) if drained is not None else {}
        report("partition_60s_mid_drain", heal_to_work=back, drained_after_heal=drained, **figures)
        assert back is not None and back <= BACK_TO_WORK, f"back to work after {back} s"
        assert figures["duplicates_completed"] == 0


@pytest.mark.timeout(400)
def test_long_idle_partition(fault_db: FaultDb, net: Net, workers: Workers) -> None:
    """An idle worker cut off for IDLE_PARTITION s (60 s: an outage of minutes, shortened;
    what matters is that it outlasts every keepalive): new commands are claimed within 10 s
    of the heal."""
    with psycopg.connect(fault_db.dsn, autocommit=True) as conn:
        w = workers.start(fault_db.net_dsn, "ns", "--concurrency", "2")
        probe(conn, 1)
        assert waited(lambda: count(conn, "status = 'COMPLETED'") == 1), w.text()
        net.partition()
        time.sleep(IDLE_PARTITION)
        net.heal()
        probe(conn)
        back = waited(lambda: claimed_by(conn, "ns", "probe") > 1)
        report("idle_partition", partition=IDLE_PARTITION, heal_to_work=back)
        assert back is not None and back <= BACK_TO_WORK, f"after {back} s: {w.text()[-3000:]}"
        assert waited(lambda: count(conn, "status = 'COMPLETED'") == 4), w.text()


@pytest.mark.timeout(400)
def test_partition_during_outcome_writes(fault_db: FaultDb, net: Net, workers: Workers) -> None:
    """Commands finish while the worker is cut off (20 s): their outcomes are written once,
    within 10 s of the heal; nothing runs twice."""
    with psycopg.connect(fault_db.dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="python", tool_config=sleepy(2), count=8, executions=2)
        w = workers.start(fault_db.net_dsn, "ns", "--concurrency", "4", "--python-mode", "inline")
        assert waited(lambda: count(conn, "status = 'RUNNING'") == 4), w.text()
        net.partition()
        time.sleep(20)
        net.heal()
        back = waited(lambda: terminal(conn) >= 4)
        drained = waited(lambda: terminal(conn) == 8)
        figures = table_check(conn, 8) if drained is not None else {}
        report("partition_during_writes_20s", heal_to_written=back, **figures)
        assert back is not None and back <= BACK_TO_WORK, f"outcomes written after {back} s"
        assert figures["duplicates_executed"] == 0


@pytest.mark.timeout(400)
def test_sigterm_during_a_partition(
    fault_db: FaultDb, net: Net, workers: Workers, tmp_path: Path
) -> None:
    """SIGTERM while cut off: the process ends within --shutdown-timeout + STOP_MARGIN, keeps
    the outcomes it could not write in its spool, and the next start writes them."""
    spool = tmp_path / "spool"
    opts = ("--concurrency", "4", "--python-mode", "inline", "--shutdown-timeout", "5")
    with psycopg.connect(fault_db.dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="python", tool_config=sleepy(1), count=4)
        w = workers.start(fault_db.net_dsn, "ns", *opts, "--spool-dir", str(spool))
        assert waited(lambda: count(conn, "status = 'RUNNING'") == 4), w.text()
        net.partition()
        time.sleep(3)  # the commands end; their outcomes cannot be written
        t0 = time.monotonic()
        w.signal(signal.SIGTERM)
        try:
            w.wait(PATIENCE)
            stopped: float | None = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            stopped = None
        kept = spool / "ns.jsonl"
        lines = kept.read_text().splitlines() if kept.exists() else []
        net.heal()
        t1 = time.monotonic()
        again = workers.start(fault_db.net_dsn, "ns", *opts, "--spool-dir", str(spool))
        written = waited(lambda: count(conn, "status = 'COMPLETED'") == 4)
        figures = table_check(conn, 4) if written is not None else {}
        report(
            "sigterm_during_partition",
            sigterm_to_exit=stopped,
            spooled=len(lines),
            restart_to_written=None if written is None else time.monotonic() - t1,
            **figures,
        )
        # (+ 3 s: the deadline's own exit, on a loaded machine)
        assert stopped is not None and stopped <= 5 + STOP_MARGIN + 3, w.text()[-3000:]
        assert len(lines) == 4, lines
        assert {json.loads(line)["outcome"]["ok"] for line in lines} == {True}
        assert written is not None, again.text()
        assert figures["duplicates_executed"] == 0


@pytest.mark.timeout(400)
def test_restart_under_the_same_id_right_after_a_partition(
    fault_db: FaultDb, net: Net, workers: Workers
) -> None:
    """A worker dies while cut off (its server sessions live on, holding the worker id's lock);
    the heal comes 20 s later and it is started again under the same id at once, as a service
    manager would (again every second if it exits): it works within 10 s of the heal."""
    with psycopg.connect(fault_db.dsn, autocommit=True) as conn:
        w = workers.start(fault_db.net_dsn, "ns", "--concurrency", "2")
        probe(conn, 1)
        assert waited(lambda: count(conn, "status = 'COMPLETED'") == 1), w.text()
        net.partition()
        w.signal(signal.SIGKILL)
        w.wait(30)
        time.sleep(20)
        net.heal()
        t0 = time.monotonic()
        probe(conn)
        refused = 0
        back: float | None = None
        while time.monotonic() - t0 < PATIENCE:
            again = workers.start(fault_db.net_dsn, "ns", "--concurrency", "2")
            found = waited(
                lambda a=again: claimed_by(conn, "ns", "probe") > 1 or a.proc.poll() is not None,  # type: ignore[misc]
                PATIENCE,
            )
            if found is not None and claimed_by(conn, "ns", "probe") > 1:
                back = time.monotonic() - t0
                break
            refused += 1
            time.sleep(1)
        report("restart_same_id_after_partition", heal_to_work=back, refused_starts=refused)
        assert back is not None and back <= BACK_TO_WORK, f"back to work after {back} s"
        assert refused == 0, again.text()


@pytest.mark.timeout(400)
def test_a_frozen_holder_is_taken_over_and_steps_aside(
    fault_db: FaultDb, net: Net, workers: Workers
) -> None:
    """A worker cut off and frozen (SIGSTOP: its server sessions stay alive, and hold the
    worker id's lock) is taken over by a new process under the same id once its heartbeat is
    older than --stale-after; woken up again, the old one finds its id taken and stops: never
    two processes working under one id."""
    with psycopg.connect(fault_db.dsn, autocommit=True) as conn:
        old = workers.start(fault_db.net_dsn, "ns", "--concurrency", "2")
        probe(conn, 1)
        assert waited(lambda: count(conn, "status = 'COMPLETED'") == 1), old.text()
        old.signal(signal.SIGSTOP)
        net.partition()
        time.sleep(5)
        net.heal()
        held = scalar(
            conn,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name LIKE 'noetl-pgworker%%:ns'",
        )
        new = workers.start(fault_db.net_dsn, "ns", "--concurrency", "2")
        probe(conn)
        back = waited(lambda: claimed_by(conn, "ns", "probe") > 1)
        old.signal(signal.SIGCONT)
        try:
            old_status: int | None = old.wait(60)
        except subprocess.TimeoutExpired:
            old_status = None
        report(
            "frozen_holder_taken_over",
            old_sessions_at_heal=held,
            heal_to_work=back,
            old_exit=old_status,
        )
        assert held and held > 0  # the old process's sessions were alive at the heal
        assert back is not None and back <= BACK_TO_WORK, new.text()[-3000:]
        assert "taking over worker id 'ns'" in new.text()
        assert old_status not in (None, 0), old.text()[-3000:]
        assert "worker id 'ns' was taken over by another process" in old.text()
        assert new.proc.poll() is None, new.text()[-3000:]
        # The old process does not mark the id offline: its runtime row is the new one's.
        row = "SELECT status FROM noetl.runtime WHERE kind = 'worker_pool' AND name = 'ns'"
        assert scalar(conn, row) == "ready"
        assert waited(lambda: count(conn, "status = 'COMPLETED'") == 4), new.text()[-3000:]
