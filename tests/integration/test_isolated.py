"""The worker's own code run on a row's data in a sandboxed child: duckdb there, bounded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.errors import ToolError, ToolTimeout
from noetl_pgworker.tools import isolated, process
from noetl_pgworker.tools.pgstream import run_streamed
from noetl_pgworker.tools.resultcap import ResultCap, ResultTooLarge

from ..helpers import require_module, unavailable

pytestmark = pytest.mark.integration

DUCKDB = "noetl_pgworker.tools.duckdb_child:run"


@pytest.fixture(scope="module")
def iso() -> Iterator[isolated.Isolated]:
    sandbox = process.Sandbox(process.Limits(memory_mb=2048), preload=isolated.preload(("duckdb",)))
    runner = isolated.Isolated(sandbox)
    yield runner
    runner.close()


def duck(iso: isolated.Isolated, sql: str, tmp: Path, **kw: Any) -> Any:
    args = {
        "texts": [sql],
        "params": None,
        "db_path": ":memory:",
        "allowed": [str(tmp)],
        "max_bytes": 1024 * 1024,
        "memory_mb": 2048,
        **kw,
    }
    return iso.call(DUCKDB, args, timeout=30, what="duckdb")


def test_duckdb_runs_in_a_child_and_answers(iso: isolated.Isolated, tmp_path: Path) -> None:
    require_module("duckdb", "duckdb")
    out = duck(iso, "SELECT 41 + 1 AS n, 'x' AS s", tmp_path)
    assert out["rows"] == [{"n": 42, "s": "x"}] and out["executed_commands"] == 1


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT content FROM read_text('/proc/self/environ')",
        f"SELECT content FROM read_text('/proc/{os.getpid()}/environ')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "COPY (SELECT 1) TO '/tmp/noetl-pgworker-attack.csv'",
        "SET enable_external_access = true",
        "SET allowed_directories = ['/']",
        "INSTALL httpfs",
        "LOAD httpfs",
        "ATTACH '/tmp/noetl-pgworker-attack.duckdb' AS a",
    ],
)
def test_duckdb_reaches_nothing_outside_its_directories(
    iso: isolated.Isolated, tmp_path: Path, sql: str
) -> None:
    require_module("duckdb", "duckdb")
    with pytest.raises(ToolError) as failed:
        duck(iso, sql, tmp_path)
    assert failed.value.message.startswith("duckdb: "), failed.value.message
    assert not Path("/tmp/noetl-pgworker-attack.csv").exists()
    assert not Path("/tmp/noetl-pgworker-attack.duckdb").exists()


def test_duckdb_writes_inside_an_allowed_directory(iso: isolated.Isolated, tmp_path: Path) -> None:
    require_module("duckdb", "duckdb")
    os.chmod(tmp_path, 0o777)
    duck(iso, f"COPY (SELECT 7 AS n) TO '{tmp_path}/out.csv'", tmp_path)
    assert (tmp_path / "out.csv").read_text().split() == ["n", "7"]


def test_duckdb_result_stops_at_the_cap(iso: isolated.Isolated, tmp_path: Path) -> None:
    require_module("duckdb", "duckdb")
    with pytest.raises(ToolError) as failed:
        duck(iso, "SELECT repeat('x', 1000) FROM range(1000000)", tmp_path, max_bytes=100_000)
    assert "max-result-bytes" in failed.value.message


def test_an_endless_child_is_killed_at_the_timeout(iso: isolated.Isolated, tmp_path: Path) -> None:
    require_module("duckdb", "duckdb")
    args = {
        "texts": ["SELECT count(*) FROM range(100000000000) a"],
        "params": None,
        "db_path": ":memory:",
        "allowed": [str(tmp_path)],
        "max_bytes": 1000,
    }
    with pytest.raises(ToolTimeout):
        iso.call(DUCKDB, args, timeout=1.5, what="duckdb")


def test_postgres_rows_are_read_in_chunks_up_to_the_cap(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        out = run_streamed(
            conn,
            "SELECT g FROM generate_series(1, 600) g; CREATE TEMP TABLE t (x int);"
            " INSERT INTO t VALUES (1), (2); -- nothing\n; SELECT 1 WHERE false",
            ResultCap("postgres", 1024 * 1024),
        )
        assert [s.columns for s in out] == [["g"], None, None, ["?column?"]]
        assert [s.rowcount for s in out] == [600, -1, 2, 0]
        assert out[0].rows[-1] == (600,)
        with pytest.raises(ResultTooLarge) as failed:
            run_streamed(
                conn,
                "SELECT repeat('x', 1000) FROM generate_series(1, 1000000)",
                ResultCap("postgres", 100_000),
            )
        assert "max-result-bytes" in failed.value.message
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is usable again


RENDERED = [
    ("{{ a + 1 }}", {"a": 41}),
    ("{% for i in l %}{{ i }},{% endfor %}", {"l": [1, 2]}),
    ("{{ s.data.x * 2 }}", {"s": {"x": 3}}),
    ("[{{ a }}, {{ a ~ 'x' | tojson }}]", {"a": 1}),
    ("{{ missing.attr }}", {}),
    ({"k": ["{% if a %}yes{% endif %}", 3]}, {"a": True}),
]


@pytest.mark.parametrize(("template", "context"), RENDERED)
def test_an_isolated_template_renders_as_in_the_worker(
    iso: isolated.Isolated, template: Any, context: dict[str, Any]
) -> None:
    from noetl_pgworker import render

    here = render.render_value(template, context)
    token = render.ISOLATE.set(iso.templates(lambda: 30.0))
    try:
        there = render.render_value(template, context)
        text = render.render_text("{% if a %}t{% endif %}", {"a": 1})
    finally:
        render.ISOLATE.reset(token)
    assert there == here and text == "t"


def test_a_template_bomb_fails_in_its_own_process(iso: isolated.Isolated) -> None:
    from noetl_pgworker import render

    token = render.ISOLATE.set(iso.templates(lambda: 2.0))
    try:
        with pytest.raises(ToolTimeout):
            render.render_text(
                "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                {},
            )
        with pytest.raises(ToolError) as failed:
            render.render_text("{% for i in range(100) %}{{ '%0100000000d' % 1 }}{% endfor %}", {})
    finally:
        render.ISOLATE.reset(token)
    assert failed.value.message.startswith("templates: ")


def test_duckdb_and_templates_run_as_the_run_as_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("--run-as needs a root worker (the tests run as root in CI)")
    require_module("duckdb", "duckdb")
    from noetl_pgworker import render
    from noetl_pgworker.models import Command
    from noetl_pgworker.tools.base import ToolContext
    from noetl_pgworker.tools.duckdb import DuckdbTool

    sandbox = process.Sandbox(
        process.Limits(memory_mb=2048),
        run_as="nobody",
        preload=isolated.isolated_preload(),
        extra_env=isolated.MALLOC_ENV,
    )
    runner = isolated.Isolated(sandbox)
    try:
        tool = DuckdbTool(runner)
        command = Command(
            command_id="1",
            execution_id=1,
            step="s",
            tool_kind="duckdb",
            catalog_id=1,
            input={
                "tool_config": {
                    "query": "CREATE TABLE t AS SELECT 5 AS n; SELECT * FROM t",
                    "db_path": "local.duckdb",
                }
            },
        )
        out = tool.run(command, ToolContext(timeout=30))
        assert out["rows"] == [{"n": 5}] and out["database_path"] == "local.duckdb"
        with pytest.raises(ToolError) as refused:
            tool.run(
                Command(
                    command_id="2",
                    execution_id=1,
                    step="s",
                    tool_kind="duckdb",
                    catalog_id=1,
                    input={"tool_config": {"query": "SELECT 1", "db_path": "../../x.duckdb"}},
                ),
                ToolContext(timeout=30),
            )
        assert "outside the command's own directory" in refused.value.message
        token = render.ISOLATE.set(runner.templates(lambda: 30.0))
        try:
            assert render.render_value("{{ a * 2 }}", {"a": 21}) == 42
        finally:
            render.ISOLATE.reset(token)
    finally:
        runner.close()
