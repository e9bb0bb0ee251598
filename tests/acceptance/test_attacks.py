"""Rows written as an attacker would write them, against the real worker.

Each attack must end its own command FAILED, with a reason, within its timeout plus five
seconds, while ordinary commands keep completing, the heartbeat stays fresh, ``/readyz`` stays
200, the worker's memory stays its own, and SIGTERM still ends the worker within its bound.
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue

from ..helpers import count_status, require_module, wait_until
from .attack_harness import (
    STALE_AFTER,
    attacked_worker,
    enqueue_one,
    error_of,
    every_text,
    status_of,
    time_to_terminal,
)

pytestmark = pytest.mark.acceptance

TIMEOUT = 3
#: The worker's own memory may not grow past this while attacked (it idles near 100 MiB).
WORKER_PEAK_MB = 700

NESTED_LOOPS = (
    "http://example.invalid/{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}"
)
#: One C call of minutes (9**4096 raised to 4096): only another process can stop it.
BIG_POWER = "http://example.invalid/{{ (9**4096)**4096 > 1 }}"
MEMORY_BOMBS = {
    "percent": "{% for i in range(1000) %}{{ '%0100000000d' % 1 }}{% endfor %}",
    "center": "{% for i in range(1000) %}{{ 'x' | center(100000000) }}{% endfor %}",
    "format": "{% for i in range(1000) %}{{ '{:>100000000}'.format(1) }}{% endfor %}",
    "indent": (
        "{% set s = namespace(v='x\n') %}{% for i in range(20) %}{% set s.v = s.v ~ s.v %}"
        "{% endfor %}{% for i in range(1000) %}{{ s.v | indent(100000) }}{% endfor %}"
    ),
    "concat": (
        "{% set s = namespace(v='x' * 1000000) %}{% for i in range(100000) %}"
        "{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v | length }}"
    ),
}

TEMPLATE_ATTACKS = {
    "nested_loops": [NESTED_LOOPS],
    "gil_holding_power": [BIG_POWER],
    "memory_bombs": [f"http://example.invalid/{t}" for t in MEMORY_BOMBS.values()],
}


def _ordinary(conn: psycopg.Connection[Any]) -> None:
    enqueue(conn, tool_kind="noop", step="ordinary", count=40, executions=4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attack", sorted(TEMPLATE_ATTACKS))
def test_a_template_bomb_fails_its_command_alone(dsn: str, attack: str) -> None:
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        attacked_worker(
            dsn,
            "--concurrency",
            "8",
            "--command-timeout",
            str(TIMEOUT),
            "--shutdown-timeout",
            "5",
            "--python-memory-mb",
            "768",
        ) as worker,
    ):
        ids = [
            enqueue_one(conn, "http", {"url": url, "timeout_seconds": TIMEOUT})
            for url in TEMPLATE_ATTACKS[attack]
        ]
        _ordinary(conn)
        took = time_to_terminal(conn, ids, limit=TIMEOUT + 5 + 30)
        wait_until(lambda: count_status(conn, "COMPLETED") == 40, timeout=60, interval=0.2)
        watch = worker.stop_watching()
        print(
            f"{attack}: rows ended after {sorted(took.values())} s (timeout {TIMEOUT} s);"
            f" worker peak {watch.peak_mb:.0f} MiB;"
            f" heartbeat age max {max(watch.heartbeat_ages, default=0):.1f} s"
        )
        for command_id in ids:
            assert command_id in took, f"command {command_id} still {status_of(conn, command_id)}"
            assert took[command_id] <= TIMEOUT + 5, took
            assert status_of(conn, command_id) == "FAILED"
            assert "template" in error_of(conn, command_id), error_of(conn, command_id)
        assert watch.readyz and set(watch.readyz) == {200}, watch.readyz
        assert max(watch.heartbeat_ages) < STALE_AFTER, watch.heartbeat_ages
        assert watch.peak_mb < WORKER_PEAK_MB, watch.peak_mb
        # A stop while an attack runs is still bounded.
        last = enqueue_one(
            conn, "http", {"url": TEMPLATE_ATTACKS[attack][0], "timeout_seconds": 60}
        )
        wait_until(lambda: status_of(conn, last) == "RUNNING", timeout=30, interval=0.1)
        took_to_stop = worker.sigterm(bound=5 + 20)
        print(f"{attack}: SIGTERM ended the worker after {took_to_stop} s")
        # (exit 1 if the attack was still running at --shutdown-timeout: left for recovery)
        assert took_to_stop is not None, "SIGTERM did not end the worker in time"
        assert "stopped:" in worker.stderr, worker.stderr[-2000:]


# -- duckdb: nothing of the worker ------------------------------------------------------------

SECRETS = {
    "PGPASSWORD": "pgpassword-secret-4711",
    "NOETL_PGWORKER_CREDENTIAL_API": '{"token": "credential-token-secret-4711"}',
}
SECRET_VALUES = (
    "pgpassword-secret-4711",
    "credential-token-secret-4711",
    "pgpass-secret-4711",
    "dsn-secret-4711",
)


def _secret_env(tmp_path: Path) -> dict[str, str]:
    pgpass = tmp_path / "pgpass"
    pgpass.write_text("*:*:*:*:pgpass-secret-4711\n")
    pgpass.chmod(0o600)
    return {**SECRETS, "PGPASSFILE": str(pgpass)}


def _with_password(dsn: str) -> str:
    # The test cluster trusts every local connection: a password is accepted and ignored.
    return f"{dsn} password=dsn-secret-4711" if "=" in dsn else dsn


def test_duckdb_reads_and_writes_nothing_of_the_worker(dsn: str, tmp_path: Path) -> None:
    require_module("duckdb", "duckdb")
    env = _secret_env(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(tmp_path, 0o755)
    attacks = [
        "SELECT content FROM read_text('/proc/self/environ')",
        f"SELECT content FROM read_text('/proc/{os.getpid()}/environ')",
        f"SELECT content FROM read_text('{env['PGPASSFILE']}')",
        "SELECT content FROM read_text('/etc/shadow')",
        f"COPY (SELECT 42) TO '{outside}/copied.csv'",
        f"ATTACH '{outside}/attached.duckdb' AS a",
        "SET enable_external_access = true; SELECT content FROM read_text('/proc/self/environ')",
        "SELECT getenv('PGPASSWORD')",
    ]
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        attacked_worker(_with_password(dsn), "--command-timeout", "20", env=env),
    ):
        ids = [enqueue_one(conn, "duckdb", {"query": sql}) for sql in attacks]
        ids.append(
            enqueue_one(
                conn, "duckdb", {"query": "SELECT 1 AS one", "db_path": f"{outside}/placed.duckdb"}
            )
        )
        took = time_to_terminal(conn, ids, limit=60)
        assert len(took) == len(ids), "not every duckdb row ended"
        written = every_text(conn)
    for secret in SECRET_VALUES:
        assert secret not in written, f"{secret} leaked"
    assert sorted(p.name for p in outside.iterdir()) == [], "duckdb wrote outside its directory"
    assert "root:" not in written


# -- results: bounded by --max-result-bytes, not by the result -------------------------------

BIG_RESULTS = {
    "postgres": "SELECT repeat('x', 1000) FROM generate_series(1, 1000000)",
    "duckdb": "SELECT repeat('x', 1000) FROM range(1000000)",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(BIG_RESULTS))
def test_a_huge_result_stops_at_max_result_bytes(dsn: str, kind: str) -> None:
    if kind == "duckdb":
        require_module("duckdb", "duckdb")
    config: dict[str, Any] = {"query": BIG_RESULTS[kind]}
    if kind == "postgres":
        config["connection_string"] = dsn
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        attacked_worker(dsn, "--command-timeout", "60", "--max-result-bytes", "1048576") as worker,
    ):
        command_id = enqueue_one(conn, kind, config)
        _ordinary(conn)
        took = time_to_terminal(conn, [command_id], limit=90)
        wait_until(lambda: count_status(conn, "COMPLETED") == 40, timeout=60, interval=0.2)
        watch = worker.stop_watching()
        print(f"{kind}: ended after {took} s; worker peak {watch.peak_mb:.0f} MiB")
        assert status_of(conn, command_id) == "FAILED"
        assert "max-result-bytes" in error_of(conn, command_id), error_of(conn, command_id)
        assert watch.peak_mb < WORKER_PEAK_MB, watch.peak_mb


# -- credentials go only where they belong ----------------------------------------------------


class Capture(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.seen.append(dict(self.headers))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

        server = self
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_credential_goes_only_to_its_hosts(dsn: str) -> None:
    capture = Capture()
    env = {
        "NOETL_PGWORKER_CREDENTIAL_API": '{"token": "credential-token-secret-4711"}',
        "NOETL_PGWORKER_CREDENTIAL_BOUND": (
            '{"token": "bound-token-4711", "allowed_hosts": ["api.example.com"]}'
        ),
    }
    url = f"http://127.0.0.1:{capture.server_address[1]}/x"
    try:
        with (
            psycopg.connect(dsn, autocommit=True) as conn,
            attacked_worker(
                dsn, "--command-timeout", "20", "--http-allow-loopback", env=env
            ) as worker,
        ):
            unbound = enqueue_one(conn, "http", {"url": url, "auth": "api"})
            elsewhere = enqueue_one(conn, "http", {"url": url, "auth": "bound"})
            plain = enqueue_one(conn, "http", {"url": url})
            metrics = enqueue_one(conn, "http", {"url": f"http://127.0.0.1:{worker.port}/metrics"})
            took = time_to_terminal(conn, [unbound, elsewhere, plain, metrics], limit=60)
            assert len(took) == 4
            assert status_of(conn, plain) == "COMPLETED", error_of(conn, plain)
            for refused in (unbound, elsewhere, metrics):
                assert status_of(conn, refused) == "FAILED"
            assert "host" in error_of(conn, unbound), error_of(conn, unbound)
    finally:
        capture.shutdown()
        capture.server_close()
    sent = repr(capture.seen)
    assert "credential-token-secret-4711" not in sent and "bound-token-4711" not in sent


def test_loopback_is_refused_unless_allowed(dsn: str) -> None:
    capture = Capture()
    url = f"http://127.0.0.1:{capture.server_address[1]}/x"
    try:
        with (
            psycopg.connect(dsn, autocommit=True) as conn,
            attacked_worker(dsn, "--command-timeout", "20"),
        ):
            ids = [
                enqueue_one(conn, "http", {"url": url}),
                enqueue_one(conn, "http", {"url": "http://169.254.169.254/latest/meta-data/"}),
                enqueue_one(
                    conn, "http", {"url": f"http://localhost:{capture.server_address[1]}/"}
                ),
            ]
            time_to_terminal(conn, ids, limit=60)
            for command_id in ids:
                assert status_of(conn, command_id) == "FAILED"
                assert "loopback" in error_of(conn, command_id) or "link-local" in error_of(
                    conn, command_id
                ), error_of(conn, command_id)
    finally:
        capture.shutdown()
        capture.server_close()
    assert capture.seen == []


def test_the_workers_own_port_is_refused_when_it_was_chosen_at_start(
    start_worker: Any, conn: psycopg.Connection[Any]
) -> None:
    running = start_worker(metrics_port=0, http_allow_loopback=True)
    port = running.worker.health.port  # (port 0: the system chose it)
    command_id = enqueue_one(conn, "http", {"url": f"http://127.0.0.1:{port}/metrics"})
    wait_until(lambda: status_of(conn, command_id) == "FAILED", timeout=30, interval=0.1)
    assert "own port" in error_of(conn, command_id), error_of(conn, command_id)
