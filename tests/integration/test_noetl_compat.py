"""NoETL's shapes from its own regression suite, run by the whole worker on a real database:
python ``libs:`` and the ``context`` global, results that report failure, ``script:`` from a
file for python and postgres, ``kind: workbook`` (each seen on NoETL 4.26 with its worker)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import ensure_catalog

from ..conftest import RunningWorker
from ..helpers import insert_raw_command

pytestmark = pytest.mark.integration

Start = Callable[..., RunningWorker]


def add(
    conn: psycopg.Connection[Any],
    step: str,
    kind: str,
    config: dict[str, Any],
    args: dict[str, Any] | None = None,
    render_context: dict[str, Any] | None = None,
) -> int:
    context = {"tool_config": config, "input": args or {}, "render_context": render_context or {}}
    return insert_raw_command(conn, tool_kind=kind, context=json.dumps(context), step=step)[1]


def outcome(conn: psycopg.Connection[Any], command_id: int) -> tuple[str, Any, str | None]:
    row = conn.execute(
        "SELECT status, result, error FROM noetl.command WHERE command_id = %s", (command_id,)
    ).fetchone()
    assert row is not None
    context = (row[1] or {}).get("context")
    if isinstance(context, dict):  # the worker's own keys beside the data
        context = {k: v for k, v in context.items() if k not in ("worker_id", "command_id")}
    return row[0], context, row[2]


def drain(start_worker: Start) -> None:
    summary = start_worker(drain=True, concurrency=2).join(90)
    assert summary.claimed >= 1


def test_python_libs_are_imported_into_the_codes_namespace(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    libs = {
        "json": "json",  # import json
        "rnd": "random",  # import random as rnd
        "xml.etree.ElementTree": "xml.etree.ElementTree",  # import xml.etree.ElementTree
        "join": {"from": "os.path", "import": "join"},  # from os.path import join
        "et": {"from": "xml.etree", "import": "ElementTree"},  # a submodule
    }
    code = (
        "rnd.seed(1)\n"
        "result = {'j': json.dumps([1]), 'r': isinstance(rnd.random(), float),"
        " 'x': xml.etree.ElementTree.__name__, 'p': join('a', 'b'), 'e': et.__name__}\n"
    )
    ok = add(conn, "libs", "python", {"code": code, "libs": libs})
    missing = add(conn, "missing", "python", {"code": "result = 1", "libs": {"m": "no_such_mod"}})
    bad = add(conn, "bad", "python", {"code": "result = 1", "libs": {"m": "os; import sys"}})
    drain(start_worker)
    assert outcome(conn, ok)[:2] == (
        "COMPLETED",
        {
            "j": "[1]",
            "r": True,
            "x": "xml.etree.ElementTree",
            "p": "a/b",
            "e": "xml.etree.ElementTree",
        },
    )
    status, _, error = outcome(conn, missing)
    assert status == "FAILED" and "No module named 'no_such_mod'" in (error or "")
    status, _, error = outcome(conn, bad)
    assert status == "FAILED" and "libs" in (error or "") and "os; import sys" in (error or "")


MAIN_WITH_CONTEXT = (
    "def main(context, x, threshold):\n    return [context['threshold'], x, threshold]"
)


def test_python_code_sees_the_context_global_and_main_may_ask_for_it(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    render = {"execution_id": "77", "generate": {"n": 5}, "threshold": 3, "input": {}}
    glob = add(
        conn,
        "glob",
        "python",
        {"code": "result = {'e': context.get('execution_id'), 'n': context['generate']['n']}"},
        render_context=render,
    )
    main = add(
        conn,
        "main",
        "python",
        # `threshold` is no argument: NoETL's worker takes it from the context
        {"code": MAIN_WITH_CONTEXT},
        {"x": 1},
        render_context=render,
    )
    shadow = add(conn, "shadow", "python", {"code": "result = context"}, {"context": "mine"})
    drain(start_worker)
    assert outcome(conn, glob)[:2] == ("COMPLETED", {"e": "77", "n": 5})
    assert outcome(conn, main)[:2] == ("COMPLETED", {"data": [3, 1, 3]})
    # an argument of that name wins over the global, as in NoETL's worker
    assert outcome(conn, shadow)[:2] == ("COMPLETED", {"data": "mine"})


@pytest.mark.parametrize(
    ("result", "error"),
    [
        ("{'status': 'failed', 'checks': 2}", "Tool returned error status"),
        ("{'status': 'error', 'error': 'validation failed: 2 of 3'}", "validation failed: 2 of 3"),
    ],
)
def test_a_result_that_reports_failure_fails_the_command(
    start_worker: Start, conn: psycopg.Connection[Any], result: str, error: str
) -> None:
    failed = add(conn, "check", "python", {"code": f"result = {result}"})
    fine = add(conn, "fine", "python", {"code": "result = {'status': 'success'}"})
    drain(start_worker)
    status, context, message = outcome(conn, failed)
    assert status == "FAILED" and message == error
    assert context["error"] == error
    assert outcome(conn, fine)[0] == "COMPLETED"


def test_scripts_from_files_for_python_and_postgres(
    start_worker: Start, conn: psycopg.Connection[Any], dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "hello.py").write_text(
        "def main(name='World', count=1):\n"
        "    return {'messages': [f'Hello, {name}!' for _ in range(count)]}\n"
    )
    (tmp_path / "table.sql").write_text(
        "CREATE TABLE script_test (id int);\n"
        "INSERT INTO script_test VALUES (1), (2), ({{ third }});\n"
        "SELECT count(*) AS total FROM script_test;\n"
    )
    py = add(
        conn,
        "py",
        "python",
        {"script": {"uri": "hello.py", "source": {"type": "file"}}},
        {"name": "NoETL", "count": 2},
    )
    sql = add(
        conn,
        "sql",
        "postgres",
        {
            "connection_string": dsn,
            "script": {"uri": str(tmp_path / "table.sql"), "source": {"type": "file"}},
        },
        {"third": 3},
    )
    missing = add(
        conn,
        "missing",
        "python",
        {"script": {"uri": "/nonexistent.py", "source": {"type": "file"}}},
    )
    summary = start_worker(drain=True, concurrency=2, script_dir=str(tmp_path)).join(90)
    assert summary.claimed == 3
    assert outcome(conn, py)[:2] == ("COMPLETED", {"messages": ["Hello, NoETL!"] * 2})
    status, context, _ = outcome(conn, sql)
    assert status == "COMPLETED" and context["rows"] == [{"total": 3}]
    status, _, error = outcome(conn, missing)
    assert status == "FAILED" and "/nonexistent.py is outside the worker's --script-dir" in (
        error or ""
    )


def test_a_workbook_step_runs_its_action_or_fails_saying_why(
    start_worker: Start, conn: psycopg.Connection[Any]
) -> None:
    catalog_id = ensure_catalog(conn, "compat/workbook")
    payload = {
        "workbook": [
            {
                "name": "compute_flag",
                "tool": {
                    "kind": "python",
                    "input": {"temperature_c": None},
                    "code": "result = {'is_hot': float(temperature_c) >= 25.0}",
                },
            }
        ]
    }
    conn.execute(
        "UPDATE noetl.catalog SET payload = %s WHERE catalog_id = %s",
        (json.dumps(payload), catalog_id),
    )
    context = {"tool_config": {"name": "compute_flag", "input": {"temperature_c": 30}}}
    hot = _workbook_row(conn, catalog_id, "eval_flag", context)
    absent = _workbook_row(conn, catalog_id, "absent", {"tool_config": {"name": "nope"}})
    drain(start_worker)
    assert outcome(conn, hot)[:2] == ("COMPLETED", {"is_hot": True})
    status, _, error = outcome(conn, absent)
    assert status == "FAILED"
    assert "action 'nope' not found; the playbook's workbook has ['compute_flag']" in (error or "")


def _workbook_row(
    conn: psycopg.Connection[Any], catalog_id: int, step: str, context: dict[str, Any]
) -> int:
    row = conn.execute(
        "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id, step_name,"
        " tool_kind, status, context)"
        " SELECT noetl.snowflake_id(), noetl.snowflake_id(), noetl.snowflake_id(), %s, %s,"
        " 'workbook', 'PENDING', %s::jsonb RETURNING command_id",
        (catalog_id, step, json.dumps(context)),
    ).fetchone()
    assert row is not None
    return int(row[0])
