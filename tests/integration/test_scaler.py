"""KEDA's query (deploy/kubernetes/scaledobject.yaml), run verbatim as the worker's
least-privilege login: the live commands of the Deployment's kinds, exact at every moment
while a worker drains them, and nothing of other kinds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from noetl_pgworker import schema
from noetl_pgworker.enqueue import enqueue

from ..conftest import RunningWorker
from ..helpers import insert_raw_command, role_login, wait_until

pytestmark = pytest.mark.integration

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
LIVE = ("PENDING", "CLAIMED", "RUNNING")


def scaler() -> tuple[str, list[str]]:
    """The ScaledObject's query text and the Deployment's tool kinds."""
    query = kinds = None
    for path in MANIFESTS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ScaledObject":
                query = doc["spec"]["triggers"][0]["metadata"]["query"]
            if doc and doc["kind"] == "Deployment":
                env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
                kinds = next(e["value"] for e in env if e["name"] == "NOETL_PGWORKER_TOOL_KINDS")
    assert query and kinds
    return query, kinds.split(",")


@pytest.fixture
def worker_login_dsn(dsn: str) -> Iterator[str]:
    """A login holding nothing but the role noetl_pgworker (what KEDA connects as)."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        schema.apply(admin, with_role=True)
    with role_login(dsn, "pgw_keda") as login_dsn:
        yield login_dsn


def sample(conn: psycopg.Connection[Any], query: str, kinds: list[str]) -> tuple[int, int, int]:
    """(the scaler's number, the live commands of its kinds counted from the table, of which
    in flight), in one statement: one snapshot, so they must be equal."""
    row = conn.execute(
        # The manifest's text as it is: that is what KEDA runs.
        f"SELECT ({query}),"
        " (SELECT count(*) FROM noetl.command WHERE status = ANY(%(live)s)"
        "  AND tool_kind = ANY(%(kinds)s)),"
        " (SELECT count(*) FROM noetl.command WHERE status IN ('CLAIMED', 'RUNNING'))",
        {"live": list(LIVE), "kinds": kinds},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def by_kind(conn: psycopg.Connection[Any]) -> tuple[dict[Any, tuple[int, int]], dict[Any, Any]]:
    """The view's rows and the same counted from the table, in one statement."""
    row = conn.execute(
        "SELECT (SELECT json_object_agg(COALESCE(tool_kind, '(none)'), json_build_array("
        "        pending, in_flight)) FROM noetl.pgworker_queue_by_kind),"
        " (SELECT json_object_agg(k, json_build_array(p, f)) FROM ("
        "   SELECT COALESCE(tool_kind, '(none)') AS k,"
        "          count(*) FILTER (WHERE status = 'PENDING') AS p,"
        "          count(*) FILTER (WHERE status IN ('CLAIMED', 'RUNNING')) AS f"
        "   FROM noetl.command WHERE status IN ('PENDING', 'CLAIMED', 'RUNNING')"
        "   GROUP BY 1) AS t)"
    ).fetchone()
    assert row is not None
    return row[0] or {}, row[1] or {}


def test_the_scalers_query_is_exact_while_a_worker_drains(
    dsn: str, worker_login_dsn: str, start_worker: Callable[..., RunningWorker]
) -> None:
    query, kinds = scaler()
    assert {"noop", "python"} <= set(kinds) and "shell" not in kinds
    nap = "import time\ndef main():\n    time.sleep(0.3)\n    return 1\n"
    with psycopg.connect(dsn, autocommit=True) as admin:
        enqueue(admin, tool_kind="python", tool_config={"code": nap}, count=24)
        enqueue(admin, tool_kind="noop", count=40)
        enqueue(admin, tool_kind="shell", tool_config={"command": "true"}, count=7)
        insert_raw_command(admin, tool_kind=None, context="{}")  # its own row in the view
    with psycopg.connect(worker_login_dsn, autocommit=True) as conn:
        assert sample(conn, query, kinds) == (64, 64, 0)
        view, table = by_kind(conn)
        assert (
            view == table == {"python": [24, 0], "noop": [40, 0], "shell": [7, 0], "(none)": [1, 0]}
        )
        start_worker(tool_kinds="noop,python", concurrency=4)
        seen: list[tuple[int, int, int]] = []

        def drained() -> bool:
            seen.append(sample(conn, query, kinds))
            view, table = by_kind(conn)
            assert view == table
            return seen[-1][0] == 0

        wait_until(drained, timeout=120, interval=0.02)
        scaler_numbers = [s[0] for s in seen]
        assert all(s[0] == s[1] for s in seen), seen
        # it went down through the drain, with commands in flight on the way
        assert len(set(scaler_numbers)) >= 5, scaler_numbers
        assert scaler_numbers == sorted(scaler_numbers, reverse=True), scaler_numbers
        assert any(s[2] > 0 and s[0] > 0 for s in seen), seen
        # what is left is not this Deployment's: shell, and the row without a kind is failed
        wait_until(lambda: by_kind(conn)[0] == {"shell": [7, 0]}, timeout=30)
        assert sample(conn, query, kinds) == (0, 0, 0)
