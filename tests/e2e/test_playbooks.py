"""Playbook features on a real NoETL server, one execution each."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import (
    EXTERNAL_WORKER,
    LOCAL_PG_ALIAS,
    Execution,
    LocalHttp,
    NoetlServer,
    pg_credential,
    report,
)

Run = Callable[..., Execution]


def completed(ex: Execution) -> None:
    assert ex.terminal == "playbook.completed", ex.describe()


def test_python_chain(run: Run) -> None:
    ex = run("python_chain", {"base": 5})
    report("python_chain", ex, "consume")
    completed(ex)
    assert ex.steps_run() == ["start", "consume", "end"]
    assert ex.done("start")[-1]["x"] == 6
    consume = ex.done("consume")[-1]
    assert consume["y"] == 12
    # Jinja in the code itself, rendered by the server before the worker gets it
    assert consume["label"] == "y-6"


def test_failing_step(run: Run) -> None:
    ex = run("failing")
    report("failing", ex, "boom")
    assert ex.terminal == "playbook.failed", ex.describe()
    # NoETL follows an arc without `when` after a failed step too; the playbook still fails
    errors = [e for e in ex.events if e["event_type"] == "call.error" and e["node_name"] == "boom"]
    assert errors, ex.describe()
    assert "e2e deliberate failure" in (errors[0]["error"] or ""), ex.describe()


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_loop(run: Run, mode: str) -> None:
    ex = run(f"loop_{mode}", {"items": [1, 2, 3, 4, 5, 6]})
    report(f"loop_{mode}", ex, "summary")
    completed(ex)
    assert ex.count("squares") == 6
    assert sorted(r["sq"] for r in ex.done("squares")) == [1, 4, 9, 16, 25, 36]
    assert sorted(r["n"] for r in ex.done("squares")) == [1, 2, 3, 4, 5, 6]
    total = ex.done("summary")[-1]["total"]
    if mode == "sequential":
        assert total == 6
    else:
        # NoETL's own worker gives 5 or 6 here too: the aggregate can lag the last iteration
        assert 1 <= total <= 6


@pytest.mark.parametrize("pick", ["a", "b"])
def test_conditional_arcs(run: Run, pick: str) -> None:
    ex = run("conditional", {"pick": pick})
    report(f"conditional_{pick}", ex, f"path_{pick}")
    completed(ex)
    other = "b" if pick == "a" else "a"
    assert ex.count(f"path_{pick}") == 1
    assert ex.count(f"path_{other}") == 0
    assert ex.done(f"path_{pick}")[-1]["took"] == pick


def test_fanout_join(run: Run) -> None:
    ex = run("fanout_join")
    report("fanout_join", ex, "join")
    completed(ex)
    assert ex.count("left") == 1 and ex.count("right") == 1
    assert ex.done("left")[-1]["l"] == 11
    assert ex.done("right")[-1]["r"] == 12
    # NoETL has no join barrier: each incoming arc fires the join step (see docs)
    assert 1 <= ex.count("join") <= 2


def test_http(run: Run, local_http: LocalHttp) -> None:
    ex = run("http", {"base_url": local_http.url, "item": 7})
    report("http", ex, "check")
    completed(ex)
    assert {"method": "GET", "path": "/item/7"} in local_http.requests
    posts = [r for r in local_http.requests if r["method"] == "POST"]
    assert posts and posts[0]["body"]["got"] == "value-7", local_http.requests
    assert ex.done("check")[-1]["got"] == "value-7"


def test_postgres_server_credential(run: Run, noetl: NoetlServer) -> None:
    """A credential registered with NoETL's server (POST /api/credentials)."""
    name = f"e2e_pg_{uuid.uuid4().hex[:8]}"  # new each run: workers cache credentials
    noetl.register_credential(name, "postgres", pg_credential(noetl))
    ex = run("postgres_server", {"pg_auth": name})
    report("postgres_server", ex, "use")
    completed(ex)
    assert ex.done("use")[-1]["answer"] == 42


@pytest.mark.skipif(EXTERNAL_WORKER, reason="an alias from our worker's own environment")
def test_postgres_worker_credential(run: Run) -> None:
    """A credential our worker has in its environment (NOETL_PGWORKER_CREDENTIAL_<ALIAS>)."""
    ex = run("postgres_local", {"pg_auth": LOCAL_PG_ALIAS})
    completed(ex)
    assert ex.done("use")[-1]["answer"] == 42


def test_duckdb(run: Run) -> None:
    ex = run("duckdb")
    report("duckdb", ex, "use")
    completed(ex)
    assert ex.done("use")[-1]["commands"] == 2


def test_shell(run: Run) -> None:
    ex = run("shell", {"who": "e2e"})
    report("shell", ex, "use")
    completed(ex)
    use: dict[str, Any] = ex.done("use")[-1]
    assert use == {"out": "hello-e2e-3", "rc": 0}


def test_task_sequence(run: Run) -> None:
    ex = run("task_sequence", {"seed": 5})
    report("task_sequence", ex, "use")
    completed(ex)
    assert ex.done("use")[-1]["b"] == 60


def test_large_context(run: Run) -> None:
    """A result big enough that NoETL moves the next command's context out of the row."""
    ex = run("large_context", {"size": 20000})
    report("large_context", ex, "consume")
    completed(ex)
    assert ex.done("consume")[-1] == {"n": 3, "length": 20000}


def test_large_output(run: Run) -> None:
    """A result above what an event may carry (1.5 MiB; this one is 1.8 MB, 32,000 records):
    the next step still renders all of it (ours stores it with the server's result store and
    sends the reference, which the server resolves)."""
    ex = run("large_output", {"count": 32000}, timeout=110)
    report("large_output", ex, "consume")
    completed(ex)
    assert ex.done("consume")[-1] == {"n": 32000, "count": 32000, "last": "item-31999"}


def test_http_error_status(run: Run, local_http: LocalHttp) -> None:
    ex = run("http_error", {"base_url": local_http.url})
    report("http_error", ex, "missing")
    assert ex.terminal == "playbook.failed", ex.describe()
    assert any(
        e["event_type"] == "call.error" and e["node_name"] == "missing" for e in ex.events
    ), ex.describe()


def test_loop_over_step_result(run: Run) -> None:
    """A loop over a list an earlier step returned, its iterations reading fields of `iter`."""
    ex = run("loop_rows")
    report("loop_rows", ex, "greet")
    completed(ex)
    got = sorted((r["greeting"], r["next_age"]) for r in ex.done("greet"))
    assert got == [("hi ada", 37), ("hi bob", 42), ("hi cy", 30)]


def test_sub_playbook(run: Run, noetl: NoetlServer) -> None:
    """`kind: playbook`: the step starts another registered playbook as a child execution."""
    noetl.register("python_chain")
    ex = run("sub_playbook", {"base": 9})
    report("sub_playbook", ex, "child")
    completed(ex)
    rows = noetl.query(
        "SELECT DISTINCT execution_id FROM noetl.event WHERE parent_execution_id = %s",
        (int(ex.id),),
    )
    assert len(rows) == 1, ex.describe()
    child = noetl.wait(str(rows[0]["execution_id"]))
    assert child.terminal == "playbook.completed", child.describe()
    assert child.done("start")[-1]["x"] == 10


def test_retry_policy(run: Run, local_http: LocalHttp) -> None:
    """A single tool with `spec.policy.rules` (the server makes it a task sequence): retried."""
    key = uuid.uuid4().hex[:8]
    ex = run("retry_policy", {"url": f"{local_http.url}/flaky/{key}/2"})
    report("retry_policy", ex, "use")
    completed(ex)
    calls = [r for r in local_http.requests if r["path"].startswith(f"/flaky/{key}/")]
    assert len(calls) == 3, local_http.requests
    assert ex.done("use")[-1]["value"] == "ok-after-3"
