"""postgres: NoETL's result keys, its SQL fields, and its SQL templates."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.tools import ToolRegistry
from noetl_pgworker.tools.postgres import PostgresTool

pytestmark = pytest.mark.integration

REGISTRY = ToolRegistry([PostgresTool()])


def run(
    config: dict[str, Any],
    args: dict[str, Any] | None = None,
    render_context: dict[str, Any] | None = None,
) -> Outcome:
    context: dict[str, Any] = {"tool_config": config, "input": args or {}}
    if render_context is not None:
        context["render_context"] = render_context
    command = Command(
        command_id="7",
        execution_id=42,
        step="load",
        tool_kind="postgres",
        catalog_id=1,
        input=context,
    )
    return execute(command, REGISTRY, timeout=30)


def test_one_select_has_noetls_keys_and_a_statement_count(dsn: str) -> None:
    out = run({"dsn": dsn, "query": "SELECT 1 AS a, 'x' AS b"})
    assert out.ok, out.error
    assert out.data == {
        "status": "success",
        "rows": [{"a": 1, "b": "x"}],
        "row_count": 1,
        "columns": ["a", "b"],
        "statement_count": 1,
    }


def test_dml_reports_rows_affected_as_noetl_does(dsn: str) -> None:
    out = run(
        {
            "dsn": dsn,
            "command": "CREATE TEMP TABLE t (a int); INSERT INTO t VALUES (1), (2), (3);"
            " UPDATE t SET a = a + 1 WHERE a > 1",
        }
    )
    assert out.ok, out.error
    results = out.data.pop("results")
    assert out.data == {  # the last statement's, as NoETL's step result
        "status": "success",
        "row_count": 2,
        "message": "Command executed. 2 rows affected.",
        "affected_rows": 2,
        "statement_count": 3,
    }
    assert [r["row_count"] for r in results] == [-1, 3, 2]
    assert results[1]["message"] == "Command executed. 3 rows affected."


def test_sql_under_every_noetl_field(dsn: str) -> None:
    for key in ("queries", "commands", "cmd", "cmds"):
        out = run({"dsn": dsn, key: "SELECT 5 AS n"})
        assert out.ok and out.data["rows"] == [{"n": 5}], (key, out.error)
    listed = run({"dsn": dsn, "cmds": ["SELECT 1 AS a", "SELECT 2 AS b"]})
    assert listed.data["rows"] == [{"b": 2}] and listed.data["statement_count"] == 2
    encoded = base64.b64encode(b"SELECT 'b64' AS s").decode()
    for key in ("query_b64", "command_b64", "commands_b64"):
        out = run({"dsn": dsn, key: encoded})
        assert out.ok and out.data["rows"] == [{"s": "b64"}], (key, out.error)
    bad = run({"dsn": dsn, "query_b64": "not base64!"})
    assert not bad.ok and "query_b64 is not base64" in (bad.error or "")


def test_no_statements_is_noetls_empty_result(dsn: str) -> None:
    expected = {"status": "success", "message": "No SQL statements executed", "statement_count": 0}
    assert run({"dsn": dsn, "query": "-- nothing to do"}).data == expected
    # a template that renders to nothing
    assert run({"dsn": dsn, "query": "{{ skip }}"}, render_context={"skip": ""}).data == expected


def test_sql_is_rendered_against_render_context_and_quoted_arguments(dsn: str) -> None:
    render_context = {
        "workload": {"table_name": "pg_class"},
        "fetch": {"rows": [{"id": 7}], "row_count": 1},
        "execution_id": "42",
    }
    out = run(
        {
            "dsn": dsn,
            "query": "SELECT '{{ name }}' AS name, {{ fetch.rows[0].id }} AS id,"
            " '{{ execution_id }}' AS eid, '{{ workload.table_name }}' AS t",
        },
        args={"name": "O'Brien"},
        render_context=render_context,
    )
    assert out.ok, out.error
    # a step argument is quote-escaped (NoETL's task_with), step results are addressable
    assert out.data["rows"] == [{"name": "O'Brien", "id": 7, "eid": "42", "t": "pg_class"}]


def test_without_a_render_context_templates_see_the_arguments(dsn: str) -> None:
    out = run({"dsn": dsn, "query": "SELECT {{ n }} + 1 AS n, '{{ step }}' AS s"}, args={"n": 41})
    assert out.ok, out.error
    assert out.data["rows"] == [{"n": 42, "s": "load"}]


def test_a_template_that_cannot_render_is_sent_as_written(dsn: str) -> None:
    # NoETL keeps such a template (each list item is rendered on its own)
    out = run(
        {"dsn": dsn, "query": ["SELECT '{{ nope.attr }}' AS kept", "SELECT {{ n }} AS n"]}, {"n": 1}
    )
    assert out.ok, out.error
    assert [r["rows"] for r in out.data["results"]] == [[{"kept": "{{ nope.attr }}"}], [{"n": 1}]]


def test_a_task_sequence_threads_postgres_rows_into_python(dsn: str) -> None:
    from noetl_pgworker.tools import default_registry

    registry = default_registry()  # python in its own process: its output is unwrapped
    try:
        tasks = [
            {
                "name": "load",
                "kind": "postgres",
                "dsn": "{{ workload.dsn }}",
                "query": "SELECT g AS n FROM generate_series(1, {{ workload.top }}) g",
            },
            {
                "name": "total",
                "kind": "python",
                "code": "def main(rows):\n    return sum(r['n'] for r in rows)\n",
                "input": {"rows": "{{ _prev.rows }}"},
            },
        ]
        command = Command(
            command_id="8",
            execution_id=42,
            step="sum:task_sequence",
            tool_kind="task_sequence",
            catalog_id=1,
            input={
                "tool_config": {"tasks": tasks},
                "render_context": {"workload": {"dsn": dsn, "top": 4}},
            },
        )
        out = execute(command, registry, timeout=60)
    finally:
        registry.close()
    assert out.ok, out.error
    assert out.data["status"] == "ok" and out.data["_prev"] == 10
    assert out.data["results"]["load"]["row_count"] == 4
