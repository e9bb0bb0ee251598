"""Nothing the worker runs on a schedule or per command may grow with NoETL's history.

One database holds a large history (terminal commands and their events, as NoETL keeps them),
a backlog of PENDING commands of a kind the worker does not run, its own few PENDING and
claimed commands, and claims of a dead worker; it is ANALYZEd. Each statement is run under
``EXPLAIN (ANALYZE, FORMAT JSON)`` in a transaction that is rolled back, and every scan of a
``noetl.command`` or ``noetl.event`` partition is checked: never a sequential scan, and never
more rows read than the live ones. A change that brings back a scan of history fails here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from noetl_pgworker import jsontext, status
from noetl_pgworker.enqueue import enqueue, ensure_catalog
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.queries import query
from noetl_pgworker.sink import PgRow, WriteItem, pg_rows, write_back_params
from noetl_pgworker.testing import scratch_database

pytestmark = pytest.mark.integration

HISTORY = 200_000  # terminal commands, 5 per execution
EVENTS_PER_COMMAND = 2  # + one playbook.completed per execution
OTHER_BACKLOG = 5_000  # PENDING commands of a kind the worker does not run (older than its own)
OWN_PENDING = 300
KINDS = ["noop", "python", "duckdb"]
WORKER = "w"


@dataclass
class History:
    dsn: str
    held: list[Command]  # claimed by WORKER
    live: int  # PENDING + CLAIMED + RUNNING rows


def seed_history(conn: psycopg.Connection[Any], catalog: int, commands: int) -> None:
    """Terminal commands with NoETL's event rows, one INSERT ... SELECT per table."""
    conn.execute(
        "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id, step_name,"
        " tool_kind, status, attempt, context, meta, worker_id, claimed_at, started_at,"
        " completed_at, created_at, updated_at)"
        " SELECT 1000000000 + g, 1000000000 + g, 1000 + g / 5, %s, 'step',"
        " (ARRAY['noop','python','http'])[g %% 3 + 1],"
        " (ARRAY['COMPLETED','COMPLETED','COMPLETED','FAILED','CANCELLED'])[g %% 5 + 1], 1,"
        " '{}', '{}', 'old-worker', t, t, t, t, t"
        " FROM generate_series(0, %s - 1) AS g,"
        " LATERAL (SELECT now() - interval '30 days' + g * interval '1 ms') AS x(t)",
        (catalog, commands),
    )
    conn.execute(
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, created_at, event_type,"
        " node_name, status, command_id)"
        " SELECT 1000 + g / (5 * %s), %s, 1000000000 + g,"
        " (now() - interval '30 days')::timestamp,"
        " (ARRAY['command.issued','command.completed'])[g %% 2 + 1], 'step', 'COMPLETED',"
        " 1000000000 + g / %s"
        " FROM generate_series(0, %s - 1) AS g",
        (EVENTS_PER_COMMAND, catalog, EVENTS_PER_COMMAND, commands * EVENTS_PER_COMMAND),
    )
    conn.execute(
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, created_at, event_type,"
        " node_name, status)"
        " SELECT 1000 + g, %s, 2000000000 + g, (now() - interval '30 days')::timestamp,"
        " 'playbook.completed', 'end', 'COMPLETED'"
        " FROM generate_series(0, %s - 1) AS g",
        (catalog, commands // 5),
    )


@pytest.fixture(scope="module")
def history(pg_server: Any) -> Iterator[History]:
    with scratch_database(pg_server.dsn, prefix="pgw_plan", template=pg_server.template) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = off")
            catalog = ensure_catalog(conn)
            seed_history(conn, catalog, HISTORY)
            enqueue(conn, tool_kind="http", count=OTHER_BACKLOG, executions=50)
            enqueue(conn, tool_kind="noop", count=OWN_PENDING, executions=30)
            # Claims of a dead worker, long past the lease, and this worker's own claims.
            enqueue(conn, tool_kind="python", count=40, executions=4)
            conn.execute(
                "UPDATE noetl.command SET status = 'RUNNING', worker_id = 'dead',"
                " claimed_at = now() - interval '1 hour'"
                " WHERE tool_kind = 'python' AND status = 'PENDING'"
            )
            with conn.transaction():
                rows = conn.execute(
                    query("claim_commands"),
                    {"limit": 16, "tool_kinds": KINDS, "worker_id": WORKER, "session_locks": True},
                )
                cols = [d.name for d in rows.description or []]
                held = [
                    Command.from_row(dict(zip(cols, r, strict=True)))
                    for r in rows.fetchall()
                    if r[1] is not None
                ]
            assert len(held) == 16
            conn.execute("ANALYZE noetl.command, noetl.event")
            live = OTHER_BACKLOG + OWN_PENDING + 40
        yield History(dsn, held, live)


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def history_scans(
    conn: psycopg.Connection[Any], statement: sql.Composable, params: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``statement`` under EXPLAIN ANALYZE (rolled back); its scans of command/event."""
    with conn.transaction(force_rollback=True):
        plan = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + statement, params
        ).fetchone()[0]  # type: ignore[index]
    scans = [
        n
        for n in walk(plan[0]["Plan"])
        if n.get("Relation Name", "").startswith(("command_p", "event_", "command", "event"))
        and "Scan" in n["Node Type"]
    ]
    return plan, scans


def rows_read(node: dict[str, Any]) -> float:
    per_loop = (
        node.get("Actual Rows", 0)
        + node.get("Rows Removed by Filter", 0)
        + node.get("Rows Removed by Index Recheck", 0)
    )
    return float(per_loop * max(1, node.get("Actual Loops", 1)))


def assert_flat(
    conn: psycopg.Connection[Any], name: str, params: Any, *, bound: float
) -> list[dict[str, Any]]:
    plan, scans = history_scans(conn, query(name), params)
    seq = [n["Relation Name"] for n in scans if n["Node Type"] == "Seq Scan"]
    assert not seq, (name, seq, json.dumps(plan)[:3000])
    read = sum(rows_read(n) for n in scans)
    assert read <= bound, (name, read, json.dumps(plan)[:3000])
    return scans


@pytest.fixture
def hconn(history: History) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(history.dsn, autocommit=True) as c:
        yield c


def items_for(held: list[Command]) -> list[PgRow]:
    items = [WriteItem(c.ref, started=True, outcome=Outcome.success({"ok": True})) for c in held]
    return pg_rows(items, WORKER, 1 << 20)


def id_params(held: list[Command]) -> dict[str, Any]:
    return {
        "items": jsontext.dumps(
            [{"execution_id": c.ref.execution_id, "command_id": c.ref.command_id} for c in held]
        ),
        "worker_id": WORKER,
        "execution_ids": sorted({c.ref.execution_id for c in held}),
        "command_ids": [c.ref.command_id for c in held],
    }


def test_claim_reads_neither_history_nor_other_kinds_backlog(
    history: History, hconn: psycopg.Connection[Any]
) -> None:
    # The other kind's backlog is older than this worker's PENDING rows: a claim that walks the
    # queue in created_at order reads all of it before it finds its own.
    scans = assert_flat(
        hconn,
        "claim_commands",
        {"limit": 16, "tool_kinds": KINDS, "worker_id": "probe", "session_locks": True},
        bound=16 * (len(KINDS) + 1) * 4 + 200,
    )
    # The ended-execution check reads NoETL's events of the candidates' executions by index.
    ev = [n for n in scans if n["Relation Name"].startswith("event")]
    assert ev and all("Index" in n["Node Type"] for n in ev), ev


def test_claim_still_takes_rows_without_a_tool_kind_oldest_first(
    history: History, hconn: psycopg.Connection[Any]
) -> None:
    from ..helpers import insert_raw_command

    params = {"tool_kinds": KINDS, "worker_id": "probe", "session_locks": True}
    with hconn.transaction(force_rollback=True):
        oldest = [
            r[0]
            for r in hconn.execute(
                "SELECT command_id FROM noetl.command WHERE status = 'PENDING'"
                " AND tool_kind = 'noop' ORDER BY created_at, command_id LIMIT 5"
            )
        ]
        rows = hconn.execute(query("claim_commands"), {**params, "limit": 5}).fetchall()
        assert [r[1] for r in rows] == oldest
    with hconn.transaction(force_rollback=True):
        insert_raw_command(hconn, tool_kind=None, context="{}")
        insert_raw_command(hconn, tool_kind="wasm", context="{}")
        insert_raw_command(hconn, tool_kind="noop", context="{}", step="__orchestrate__")
        rows = hconn.execute(query("claim_commands"), {**params, "limit": 1000}).fetchall()
        claimed = [r for r in rows if r[1] is not None]
        kinds = [r[8] for r in claimed]
        assert len(claimed) == OWN_PENDING - 16 + 1
        assert kinds.count(None) == 1 and set(kinds) == {"noop", None}
        assert all(r[7] != "__orchestrate__" for r in claimed)
        created = [r[15] for r in claimed]  # created_at
        assert created == sorted(created)


def test_reclaim_reads_only_live_claims(history: History, hconn: psycopg.Connection[Any]) -> None:
    assert_flat(
        hconn,
        "reclaim_commands",
        {
            "limit": 16,
            "tool_kinds": KINDS,
            "worker_id": WORKER,
            "known": [int(c.command_id) for c in history.held],
            "lease": 120,
            "stale_after": 30,
            "max_attempts": 3,
            "session_locks": True,
        },
        bound=1_000,
    )


def test_write_back_release_and_held_read_only_their_rows(
    history: History, hconn: psycopg.Connection[Any]
) -> None:
    held = history.held
    assert_flat(hconn, "write_back", write_back_params(items_for(held), WORKER), bound=200)
    assert_flat(hconn, "release_commands", id_params(held), bound=200)
    assert_flat(hconn, "held_commands", id_params(held), bound=200)


def test_heartbeat_and_workers_never_touch_commands_or_events(
    hconn: psycopg.Connection[Any],
) -> None:
    params = {
        "name": WORKER,
        "labels": "{}",
        "capabilities": "{}",
        "capacity": 16,
        "runtime": "{}",
    }
    assert assert_flat(hconn, "runtime_heartbeat", params, bound=0) == []
    assert assert_flat(hconn, "status_workers", {}, bound=0) == []


def test_metrics_sampler_reads_only_live_rows(
    history: History, hconn: psycopg.Connection[Any]
) -> None:
    assert_flat(hconn, "queue_depth", {}, bound=2 * history.live)
    assert_flat(hconn, "status_stuck", {"lease": 120}, bound=2 * history.live)


def test_the_scalers_query_reads_only_live_rows(
    history: History, hconn: psycopg.Connection[Any]
) -> None:
    """KEDA runs it every 15 s per ScaledObject (deploy/kubernetes/scaledobject.yaml)."""
    assert_flat(hconn, "scaler_commands", {"tool_kinds": ",".join(KINDS)}, bound=2 * history.live)


class _Recorder:
    """A connection whose cursors record what they execute (what `status` runs)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.ran: list[tuple[Any, Any]] = []

    def cursor(self) -> Any:
        outer = self

        class Cur:
            def __enter__(self) -> Any:
                self.cur = outer.conn.cursor()
                return self

            def __exit__(self, *exc: Any) -> None:
                self.cur.close()

            def execute(self, statement: Any, params: Any = None) -> Any:
                outer.ran.append((statement, params))
                return self.cur.execute(statement, params)

            def fetchall(self) -> Any:
                return self.cur.fetchall()

            def fetchone(self) -> Any:
                return self.cur.fetchone()

        return Cur()


@pytest.mark.parametrize("watch_rounds", [1, 3])
def test_status_reads_only_live_rows_and_estimates_history(
    history: History, hconn: psycopg.Connection[Any], watch_rounds: int
) -> None:
    rec = _Recorder(hconn)
    for _ in range(watch_rounds):  # `status --watch` repeats the same reading
        st = status.read_status(rec, 120)  # type: ignore[arg-type]
    assert len(rec.ran) == 7 * watch_rounds
    for statement, params in rec.ran:
        _plan, scans = history_scans(hconn, statement, params)
        seq = [n["Relation Name"] for n in scans if n["Node Type"] == "Seq Scan"]
        assert not seq, (statement.as_string(hconn), seq)
        assert sum(rows_read(n) for n in scans) <= 2 * history.live
    # Live commands exact, by kind; history estimated from the statistics, near the truth.
    assert st.counts["PENDING"] == {"http": OTHER_BACKLOG, "noop": OWN_PENDING - 16}
    assert st.counts["CLAIMED"] == {"noop": 16}
    assert st.counts["RUNNING"] == {"python": 40}
    assert set(st.estimated) == {"COMPLETED", "FAILED", "CANCELLED"}
    assert abs(st.estimated["COMPLETED"] - HISTORY * 3 / 5) < HISTORY * 0.05
    assert abs(sum(st.estimated.values()) - HISTORY) < HISTORY * 0.05
    assert st.as_dict()["estimated"] == ["CANCELLED", "COMPLETED", "FAILED"]
    assert "~" in status.format_status(st)


def test_the_worker_sessions_keep_one_generic_plan_that_prunes_as_it_runs(
    history: History,
) -> None:
    """On the worker's own sessions (direct mode) the write-back and the claim are planned
    once: PostgreSQL, left to choose, re-planned the write-back at every execution. The
    generic plan still reads only the batch's rows with the history in place."""
    from noetl_pgworker.db import worker_session_kwargs

    # In another worker's name: the fence lets nothing change, the plan is the same.
    params = write_back_params(items_for(history.held), "nobody")
    with psycopg.connect(
        history.dsn, autocommit=True, **worker_session_kwargs(history.dsn, "direct")
    ) as conn:
        for _ in range(8):
            assert conn.execute(query("write_back"), params, prepare=True).fetchall() == []
        plans = conn.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%%jsonb_to_recordset%%'"
        ).fetchone()
        assert plans is not None and plans[0] >= 8 and plans[1] == 0, plans
        # The generic plan, run: PREPARE at SQL level (the same text, $n placeholders).
        names = ["items", "events", "execution_ids", "command_ids", "worker_id"]
        text = query("write_back").as_string(conn)
        for i, name in enumerate(names, 1):
            text = text.replace(f"%({name})s", f"${i}")
        assert "%(" not in text
        conn.execute(f"PREPARE wb(text, text, bigint[], bigint[], text) AS {text}")
        with conn.transaction(force_rollback=True):
            # (values bound client-side: EXPLAIN EXECUTE takes no protocol parameters)
            plan = (
                psycopg.ClientCursor(conn)
                .execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON)"
                    " EXECUTE wb(%s::text, %s::text, %s::bigint[], %s::bigint[], %s::text)",
                    [params[n] for n in names],
                )
                .fetchone()[0]  # type: ignore[index]
            )
    scans = [
        n
        for n in walk(plan[0]["Plan"])
        if n.get("Relation Name", "").startswith(("command", "event")) and "Scan" in n["Node Type"]
    ]
    assert scans and not [n for n in scans if n["Node Type"] == "Seq Scan"], json.dumps(plan)
    assert sum(rows_read(n) for n in scans) <= 200, json.dumps(plan)[:3000]


def test_status_counts_recent_failures_exactly_from_their_index(
    history: History, hconn: psycopg.Connection[Any]
) -> None:
    """FAILED and CANCELLED commands of the last hours: exact, and read from
    pgworker_command_failed_idx alone however many the history holds (80,000 here, a month
    old)."""
    with hconn.transaction(force_rollback=True):
        hconn.execute(
            "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id,"
            " step_name, tool_kind, status, context, meta, completed_at)"
            " SELECT 3000000000 + g, 3000000000 + g, 3000 + g, catalog_id, 'step',"
            " (ARRAY['python','http'])[g % 2 + 1],"
            " (ARRAY['FAILED','FAILED','CANCELLED'])[g % 3 + 1], '{}', '{}',"
            " now() - g * interval '1 minute'"
            " FROM generate_series(0, 59) AS g,"
            " (SELECT catalog_id FROM noetl.command LIMIT 1) AS c"
        )
        params = {"seconds": 3600.0}
        plan, scans = history_scans(hconn, query("status_recent_failures"), params)
        assert scans and all(n["Node Type"] != "Seq Scan" for n in scans), plan
        # the partial index on completed_at: a range of it, nothing of the month-old failures
        assert all("completed_at" in n.get("Index Cond", "") for n in scans), plan
        assert sum(rows_read(n) for n in scans) <= 60, plan
        st = status.read_status(hconn, 120, recent_hours=1.0)
    # g = 0..59 minutes ago, the last hour: 40 FAILED and 20 CANCELLED, python and http alike
    assert st.recent_failures == {
        "CANCELLED": {"http": 10, "python": 10},
        "FAILED": {"http": 20, "python": 20},
    }
    assert "failed or cancelled in the last 1 h (exact):" in status.format_status(st)
