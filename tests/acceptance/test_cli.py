"""The real ``noetl-pgworker`` command in a subprocess: what a user or systemd runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from ..helpers import count_status, scalar, wait_until

pytestmark = pytest.mark.acceptance


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noetl_pgworker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "noetl_pgworker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_apply_enqueue_start_sigterm(empty_dsn: str) -> None:
    r = cli("schema", "apply", "--with-noetl-tables", "--dsn", empty_dsn)
    assert r.returncode == 0, r.stderr
    r = cli("schema", "verify", "--dsn", empty_dsn)
    assert r.returncode == 0 and "schema ok" in r.stderr
    r = cli("enqueue", "--dsn", empty_dsn, "--count", "50", "--executions", "5")
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert len(lines) == 50 and len({eid for _, eid in lines}) == 5  # command and execution ids
    shown = cli("show", "--dsn", empty_dsn, lines[0][0])
    assert shown.returncode == 0 and f"execution {lines[0][1]}" in shown.stdout
    r = cli(
        "enqueue",
        "--dsn",
        empty_dsn,
        "--tool-kind",
        "python",
        "--step",
        "calc",
        "--config",
        '{"code": "def main(a, b):\\n    return {\\"sum\\": a + b}\\n"}',
        "--input",
        '{"a": 2, "b": 3}',
    )
    assert r.returncode == 0, r.stderr
    worker = spawn(
        "start",
        "--worker-id",
        "acc-1",
        "--log-format",
        "json",
        env={"NOETL_PGWORKER_DSN": empty_dsn, "NOETL_PGWORKER_CONCURRENCY": "4"},
    )
    try:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            wait_until(lambda: count_status(conn, "COMPLETED") == 51, timeout=30)
            assert (
                scalar(
                    conn,
                    "SELECT result -> 'context' ->> 'sum' FROM noetl.command"
                    " WHERE step_name = 'calc'",
                )
                == "5"
            )
            assert scalar(conn, "SELECT capacity FROM noetl.runtime WHERE name = 'acc-1'") == 4
            worker.send_signal(signal.SIGTERM)
            _out, err = worker.communicate(timeout=30)
            assert worker.returncode == 0, err
            assert (
                scalar(conn, "SELECT status FROM noetl.runtime WHERE name = 'acc-1'") == "offline"
            )
    finally:
        if worker.poll() is None:
            worker.kill()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and all(line["worker_id"] == "acc-1" for line in lines)
    assert any(line.get("action") == "stopped" for line in lines)


def test_drain_exits_zero_when_the_queue_is_empty(dsn: str) -> None:
    assert cli("enqueue", "--dsn", dsn, "--count", "20").returncode == 0
    r = cli("start", "--dsn", dsn, "--drain")
    assert r.returncode == 0, r.stderr
    assert "20 claimed, 20 completed" in r.stderr
    st = cli("status", "--dsn", dsn, "--json", "--exact")
    assert st.returncode == 0
    data = json.loads(st.stdout)
    assert data["totals"] == {"COMPLETED": 20} and data["estimated"] == []
    assert data["workers"][0]["status"] == "offline"
    # the offline row keeps the final figures
    assert data["workers"][0]["completed"] == 20 and data["workers"][0]["in_flight"] == 0
    table = cli("status", "--dsn", dsn, "--exact")
    assert "COMPLETED" in table.stdout and "noop" in table.stdout


def test_status_counts_live_commands_and_estimates_history_unless_exact(dsn: str) -> None:
    assert cli("enqueue", "--dsn", dsn, "--count", "30", "--tool-kind", "python").returncode == 0
    assert cli("enqueue", "--dsn", dsn, "--count", "2000", "--executions", "40").returncode == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE noetl.command SET status = 'COMPLETED' WHERE tool_kind = 'noop'")
        conn.execute(
            "UPDATE noetl.command SET status = 'FAILED' WHERE command_id IN (SELECT command_id"
            " FROM noetl.command WHERE tool_kind = 'noop' ORDER BY random() LIMIT 500)"
        )
        exact = dict(
            conn.execute("SELECT status, count(*) FROM noetl.command GROUP BY status").fetchall()
        )
        conn.execute("VACUUM ANALYZE noetl.command")
    r = cli("status", "--dsn", dsn, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    # Live commands counted, by kind; history estimated from the statistics and marked so.
    assert data["counts"] == {"PENDING": {"python": 30}} and data["exact"] is False
    assert data["estimated"] == ["COMPLETED", "FAILED"]
    for status in ("COMPLETED", "FAILED"):
        assert abs(data["totals"][status] - exact[status]) <= exact[status] * 0.1
    table = cli("status", "--dsn", dsn).stdout
    assert "~" in table and "estimate" in table
    r = cli("status", "--dsn", dsn, "--json", "--exact")
    data = json.loads(r.stdout)
    assert data["totals"] == exact and data["estimated"] == [] and data["exact"] is True
    assert set(data["counts"]["COMPLETED"]) == {"noop"}


def test_a_database_that_is_not_there_is_one_clear_line(pg_server: Any) -> None:
    bad = "host=127.0.0.1 port=1 user=u password=s3cr3t-pw dbname=x connect_timeout=2"
    for args in (
        ["start", "--dsn", bad, "--connect-timeout", "2"],
        ["status", "--dsn", bad],
        ["schema", "verify", "--dsn", bad],
    ):
        r = cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("noetl-pgworker: error:"), r.stderr
        assert "Traceback" not in r.stderr
        assert "s3cr3t-pw" not in r.stderr + r.stdout
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_start_refuses_a_database_without_the_schema(empty_dsn: str) -> None:
    r = cli("start", "--dsn", empty_dsn)
    assert r.returncode == 1
    assert "lacks what the worker needs" in r.stderr and "table noetl.command" in r.stderr
    assert "schema apply" in r.stderr
    assert "Traceback" not in r.stderr
    v = cli("schema", "verify", "--dsn", empty_dsn)
    assert v.returncode == 1 and "missing: table noetl.command" in v.stdout


def test_dsn_from_libpq_environment(dsn: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    env = {
        "PGHOST": str(params["host"]),
        "PGPORT": str(params["port"]),
        "PGUSER": str(params["user"]),
        "PGDATABASE": str(params["dbname"]),
        "NOETL_PGWORKER_DSN": "",
    }
    r = cli("schema", "verify", env=env)
    assert r.returncode == 0, r.stderr


def test_second_signal_stops_at_once(dsn: str) -> None:
    code = '{"code": "import time\\ntime.sleep(30)\\nresult = 1"}'
    assert cli("enqueue", "--dsn", dsn, "--tool-kind", "python", "--config", code).returncode == 0
    worker = spawn("start", "--dsn", dsn, "--shutdown-timeout", "60")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_until(lambda: count_status(conn, "RUNNING") == 1, timeout=30)
        worker.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGINT)
        worker.communicate(timeout=10)
        assert worker.returncode == 130
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_noetl_style_pipeline_http_python_postgres(dsn: str) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"items": [{"id": 1, "qty": 2}, {"id": 2, "qty": 5}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/items"
    steps = [
        ("fetch", "http", {"url": url}, {}),
        (
            "total",
            "python",
            {"code": "def main(items):\n    return {'total': sum(i['qty'] for i in items)}\n"},
            {"items": [{"id": 1, "qty": 2}, {"id": 2, "qty": 5}]},
        ),
        (
            "store",
            "postgres",
            {
                "dsn": dsn,
                "query": "CREATE TABLE totals (total int); INSERT INTO totals VALUES (7);"
                " SELECT total FROM totals",
            },
            {},
        ),
    ]
    try:
        for step, kind, config, args in steps:
            r = cli(
                "enqueue",
                "--dsn",
                dsn,
                "--tool-kind",
                kind,
                "--step",
                step,
                "--config",
                json.dumps(config),
                "--input",
                json.dumps(args),
            )
            assert r.returncode == 0, r.stderr
        r = cli("start", "--dsn", dsn, "--drain", "--http-allow-loopback")
        assert r.returncode == 0, r.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
    with psycopg.connect(dsn) as conn:
        results = dict(conn.execute("SELECT step_name, result FROM noetl.command").fetchall())
        assert conn.execute(
            "SELECT count(*) FROM noetl.command WHERE status = 'COMPLETED'"
        ).fetchone() == (3,)
    assert results["fetch"]["context"]["data"]["items"][1]["qty"] == 5
    assert results["fetch"]["context"]["status_code"] == 200
    assert results["total"]["context"]["total"] == 7
    assert results["store"]["context"]["results"][-1]["rows"] == [{"total": 7}]


def test_status_watch_json_streams_until_interrupted(dsn: str) -> None:
    assert cli("enqueue", "--dsn", dsn, "--count", "3").returncode == 0
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "noetl_pgworker",
            "status",
            "--dsn",
            dsn,
            "--watch",
            "0.3",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline() if proc.stdout else ""
    second = proc.stdout.readline() if proc.stdout else ""
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    for line in (first, second):
        data = json.loads(line)
        assert data["totals"] == {"PENDING": 3}
        assert data["stuck_past_lease"] == 0 and "commands_per_s" in data


def test_make_demos_job_accounts_for_every_command(pg_server: Any) -> None:
    """`make demo` runs scripts/demo.py: the README's first command must keep working (it once
    reported a mismatch when `status` began to estimate history)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"
    env = {**os.environ, "NOETL_PGWORKER_DSN": pg_server.dsn}
    r = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "all commands accounted for" in r.stdout + r.stderr
    assert "2225/2225 commands terminal" in r.stdout


def test_restarts_keep_one_identity_and_prune_workers_gone_for_good(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """Without --worker-id a worker is the host: three starts leave one runtime row. A worker
    gone for more than a day is removed at the next start; NoETL's own rows are not."""
    conn.execute(
        "INSERT INTO noetl.runtime (runtime_id, name, kind, status, labels, heartbeat,"
        " created_at, updated_at) VALUES"
        " (noetl.snowflake_id(), 'retired', 'worker_pool', 'offline',"
        "  '{\"worker\": \"noetl-pgworker\"}', now() - interval '2 days', now(), now()),"
        " (noetl.snowflake_id(), 'recent', 'worker_pool', 'offline',"
        "  '{\"worker\": \"noetl-pgworker\"}', now() - interval '2 hours', now(), now()),"
        " (noetl.snowflake_id(), 'noetl-rust', 'worker_pool', 'offline',"
        "  '{}', now() - interval '9 days', now(), now())"
    )
    env = {k: v for k, v in os.environ.items() if k != "NOETL_PGWORKER_INSTANCE"}
    for _ in range(3):
        r = subprocess.run(
            [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn, "--drain"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
    names = [row[0] for row in conn.execute("SELECT name FROM noetl.runtime ORDER BY name")]
    assert names == sorted(["noetl-rust", "recent", socket.gethostname()]), names
