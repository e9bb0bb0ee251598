"""PgCommandSource against a real database: what it claims, what it leaves, what it writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from noetl_pgworker import CommandSource
from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.queries import query
from noetl_pgworker.sink import PgSink, WriteItem
from noetl_pgworker.source import ClaimOptions, PgCommandSource, SourceHooks

from ..helpers import insert_raw_command, scalar

pytestmark = pytest.mark.integration


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as p:
        yield p


def make_source(
    pool: ConnectionPool[Any], worker_id: str = "w1", kinds=("noop", "python"), **kw: Any
) -> PgCommandSource:
    hooks = {k: kw.pop(k) for k in list(kw) if k in SourceHooks.__dataclass_fields__}
    return PgCommandSource(
        pool,
        worker_id=worker_id,
        tool_kinds=kinds,
        hooks=SourceHooks(**hooks),
        options=ClaimOptions(**kw),
    )


def test_pg_source_conforms_to_the_protocol(pool: ConnectionPool[Any]) -> None:
    assert isinstance(make_source(pool), CommandSource)


def test_claim_marks_rows_and_writes_claimed_events(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="noop", count=10, executions=3)
    got = make_source(pool).claim(4)
    assert len(got) == 4
    rows = conn.execute(
        "SELECT command_id, status, worker_id, claimed_at IS NOT NULL, latest_event_id"
        " FROM noetl.command WHERE status = 'CLAIMED'"
    ).fetchall()
    assert {str(r[0]) for r in rows} == {c.command_id for c in got}
    assert all(r[1] == "CLAIMED" and r[2] == "w1" and r[3] for r in rows)
    events = conn.execute(
        "SELECT event_id, command_id, status, result, meta FROM noetl.event"
        " WHERE event_type = 'command.claimed'"
    ).fetchall()
    assert len(events) == 4
    assert {e[0] for e in events} == {r[4] for r in rows}  # latest_event_id = the claim event
    for _eid, cid, status, result, meta in events:
        assert status == "RUNNING"
        assert result == {"status": "RUNNING", "context": {"command_id": cid}}
        assert meta == {
            "command_id": cid,
            "worker_id": "w1",
            "actionable": False,
            "informative": True,
        }
    assert scalar(conn, "SELECT count(*) FROM noetl.command WHERE status = 'PENDING'") == 6


def test_claims_oldest_first(pool: ConnectionPool[Any], conn: psycopg.Connection[Any]) -> None:
    first = enqueue(conn, tool_kind="noop", count=3)
    enqueue(conn, tool_kind="noop", count=3)
    got = make_source(pool).claim(3)
    assert [int(c.command_id) for c in got] == list(first.command_ids)


def test_claims_only_its_tool_kinds_and_never_control_commands(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="python", count=2)
    enqueue(conn, tool_kind="http", count=2)
    enqueue(conn, tool_kind="wasm", count=2)
    enqueue(conn, tool_kind="noop", step="__orchestrate__", count=2)
    got = make_source(pool, kinds=("noop", "python", "wasm")).claim(50)
    assert sorted(c.tool_kind for c in got) == ["python", "python"]
    assert scalar(conn, "SELECT count(*) FROM noetl.command WHERE status = 'PENDING'") == 6


def test_commands_of_ended_executions_are_cancelled_not_run(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    ended = enqueue(conn, tool_kind="noop", count=2)
    live = enqueue(conn, tool_kind="noop", count=1)
    conn.execute(
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type, status)"
        " VALUES (%s, %s, noetl.snowflake_id(), 'playbook.failed', 'FAILED')",
        (ended.execution_ids[0], ended.catalog_id),
    )
    source = make_source(pool)
    got = source.claim(10)
    assert [int(c.command_id) for c in got] == list(live.command_ids)
    rows = conn.execute(
        "SELECT status, error FROM noetl.command WHERE execution_id = %s", (ended.execution_ids[0],)
    ).fetchall()
    assert [r[0] for r in rows] == ["CANCELLED", "CANCELLED"]
    assert all("already ended (playbook.failed)" in r[1] for r in rows)
    assert source.counts.cancelled == 2


def test_respects_noetls_advisory_lock(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any], dsn: str
) -> None:
    first, second = enqueue(conn, tool_kind="noop", count=2).command_ids
    with psycopg.connect(dsn) as other:
        # A NoETL server claiming `first` over HTTP holds this lock in its transaction.
        other.execute("SELECT pg_advisory_lock(%s)", (first,))
        got = make_source(pool).claim(10)
        assert [int(c.command_id) for c in got] == [second]
        other.execute("SELECT pg_advisory_unlock(%s)", (first,))
    assert [int(c.command_id) for c in make_source(pool, "w2").claim(10)] == [first]


def test_skip_locked_hands_each_row_to_one_claimer(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any], dsn: str
) -> None:
    enqueue(conn, tool_kind="noop", count=5)
    with psycopg.connect(dsn) as other, other.cursor() as cur:
        cur.execute(
            query("claim_commands"),
            {"limit": 3, "tool_kinds": ["noop"], "worker_id": "x", "session_locks": True},
        )
        # `other` has not committed: its three rows are locked, not visible as CLAIMED yet.
        got = make_source(pool).claim(10)
        assert len(got) == 2
        other.commit()
    assert scalar(conn, "SELECT count(DISTINCT worker_id) FROM noetl.command") == 2


def test_malformed_rows_are_reported_not_raised(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    insert_raw_command(conn, tool_kind="noop", context='"just a string"')
    insert_raw_command(conn, tool_kind=None, context="{}")
    enqueue(conn, tool_kind="noop", count=1)
    seen: list[tuple[int, str]] = []
    source = make_source(pool, on_malformed=lambda ref, why: seen.append((ref.command_id, why)))
    got = source.claim(10)
    assert len(got) == 1
    assert sorted(why for _, why in seen) == [
        "malformed command: context is a JSON string, not an object",
        "malformed command: tool_kind is empty",
    ]


def test_release_puts_unstarted_claims_back(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any], dsn: str
) -> None:
    enqueue(conn, tool_kind="noop", count=5)
    source = make_source(pool)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN noetl_pgworker_command")
        source._claim(5)
        assert source.buffered() == 5
        assert source.release_unstarted() == 5
        assert len(list(listener.notifies(timeout=1.0, stop_after=1))) == 1
    rows = conn.execute("SELECT status, worker_id, claimed_at FROM noetl.command").fetchall()
    assert rows and all(r == ("PENDING", None, None) for r in rows)


def test_a_write_by_a_worker_that_lost_its_claim_changes_nothing(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    from noetl_pgworker.models import Outcome

    enqueue(conn, tool_kind="noop", count=1)
    (cmd,) = make_source(pool, worker_id="zombie").claim(1)
    # The claim is taken over (as recovery would) and the new owner finishes the command.
    conn.execute("UPDATE noetl.command SET worker_id = 'new-owner', status = 'RUNNING'")
    before_row = conn.execute("SELECT * FROM noetl.command").fetchall()
    before_events = scalar(conn, "SELECT count(*) FROM noetl.event")
    ref = cmd.ref
    out = Outcome.success({"stale": True})
    item = WriteItem(ref, outcome=out)
    assert PgSink(pool, "zombie").write([item]) == set()
    assert conn.execute("SELECT * FROM noetl.command").fetchall() == before_row
    assert scalar(conn, "SELECT count(*) FROM noetl.event") == before_events
    # ... and a terminal row is never moved again, even by its owner.
    conn.execute("UPDATE noetl.command SET worker_id = 'zombie', status = 'COMPLETED'")
    assert PgSink(pool, "zombie").write([item]) == set()


def test_claim_query_uses_the_partial_index_with_100k_rows_of_history(
    conn: psycopg.Connection[Any],
) -> None:
    enqueue(conn, tool_kind="noop", count=100_000, executions=64)
    conn.execute("UPDATE noetl.command SET status = 'COMPLETED'")
    enqueue(conn, tool_kind="noop", count=200, executions=16)
    # VACUUM too: autovacuum may or may not have visited a partition by now, and the plan is
    # judged on the state it leaves (a seq scan of one partition was chosen once in CI).
    conn.execute("VACUUM ANALYZE noetl.command")
    plan = conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) ") + query("claim_commands"),
        {"limit": 16, "tool_kinds": ["noop", "python"], "worker_id": "w", "session_locks": True},
    ).fetchone()[0]  # type: ignore[index]
    # Partial indexes that hold live rows only: the worker's two claim indexes (kinds are read
    # from the per-kind one) and NoETL's index of PENDING/CLAIMED rows.
    claim_indexes = {
        r[0]
        for idx in (
            "noetl.pgworker_command_claim_idx",
            "noetl.pgworker_command_kind_claim_idx",
            "noetl.pgworker_command_badkind_idx",
            "noetl.idx_command_status_active",
        )
        for r in conn.execute(
            "SELECT relid::regclass::text FROM pg_partition_tree(%s::regclass)", (idx,)
        )
    }

    def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", []):
            yield from walk(child)

    # The candidate scan (the CTE that picks rows) is what must not read history.
    (candidate,) = [n for n in walk(plan[0]["Plan"]) if n.get("Subplan Name") == "CTE candidate"]
    nodes = list(walk(candidate))
    # Executions hash to partitions at random (their ids are snowflakes): a partition that got
    # none, or only one or two executions' rows, is small enough that reading it whole is the
    # planner's right choice. The history is judged where there is some: 2,000 rows or more.
    filled = {
        str(r[0]).removeprefix("noetl.")
        for r in conn.execute(
            "SELECT tableoid::regclass FROM noetl.command GROUP BY 1 HAVING count(*) >= 2000"
        )
    }
    scans = [n for n in nodes if n.get("Relation Name", "") in filled]
    assert scans, json.dumps(plan)[:2000]
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], [
        (n.get("Relation Name"), n.get("Filter")) for n in scans if n["Node Type"] == "Seq Scan"
    ]
    used = {n.get("Index Name") for n in scans if "Index" in n["Node Type"]}
    used = {f"noetl.{u}" for u in used if u}
    assert used and used <= claim_indexes, (used, claim_indexes)


def test_write_back_and_release_do_not_scan_the_backlog_with_100k_rows(
    pool: ConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    from noetl_pgworker import jsontext
    from noetl_pgworker.models import Outcome
    from noetl_pgworker.sink import pg_rows, write_back_params

    # A large backlog, analysed before this worker claimed anything (as in a drain).
    enqueue(conn, tool_kind="noop", count=100_000, executions=64)
    conn.execute("ANALYZE noetl.command")
    claimed = make_source(pool, worker_id="w").claim(16)
    items = pg_rows(
        [WriteItem(c.ref, started=True, outcome=Outcome.success({"ok": True})) for c in claimed],
        "w",
        1 << 20,
    )

    def command_scans(statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        plan = conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) ") + query(statement), params
        ).fetchone()[0]  # type: ignore[index]
        found, todo = [], [plan[0]["Plan"]]
        while todo:
            node = todo.pop()
            todo += node.get("Plans", [])
            if node.get("Relation Name", "").startswith("command_p"):
                found.append(node)
        return found

    for statement, params in (
        ("write_back", write_back_params(items, "w")),
        (
            "release_commands",
            {
                "items": jsontext.dumps(
                    [
                        {"execution_id": i.ref.execution_id, "command_id": i.ref.command_id}
                        for i in items
                    ]
                ),
                "worker_id": "w",
                "execution_ids": sorted({i.ref.execution_id for i in items}),
                "command_ids": [i.ref.command_id for i in items],
            },
        ),
    ):
        scans = command_scans(statement, params)
        assert scans, statement
        seq = [n["Relation Name"] for n in scans if n["Node Type"] == "Seq Scan"]
        assert not seq, (statement, seq)
