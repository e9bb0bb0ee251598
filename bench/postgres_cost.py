"""What a ``postgres`` command costs (docs/benchmarks.md): ``execute`` of one command at a time
against ``--dsn`` (default: the local server), median and p95 milliseconds per command, for a
one-row select, a 1,000-row select, a 20,000-row select and a parameterised insert.

Usage: ``python bench/postgres_cost.py [--dsn DSN] [--runs 200]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.models import Command
from noetl_pgworker.tools import default_registry

try:
    from noetl_pgworker.tools import Confinement
except ImportError:  # (a checkout from before it existed)
    Confinement = None  # type: ignore[assignment,misc]

QUERIES: dict[str, dict[str, Any]] = {
    "select 1 row": {"query": "SELECT 1 AS n"},
    "select 1,000 rows": {"query": "SELECT g, md5(g::text) FROM generate_series(1, 1000) g"},
    "select 20,000 rows": {"query": "SELECT g, md5(g::text) FROM generate_series(1, 20000) g"},
    "insert with params": {
        "query": "INSERT INTO pgw_bench_cost (n, s) VALUES (%(n)s, %(s)s)",
        "params": {"n": 1, "s": "x"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", default="host=127.0.0.1 user=postgres dbname=postgres")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS pgw_bench_cost (n int, s text)")
    if Confinement is not None:  # (a cap the 20,000-row select fits under)
        registry = default_registry(confinement=Confinement(max_result_bytes=64 * 1024 * 1024))
    else:
        registry = default_registry()
    try:
        for name, config in QUERIES.items():
            cmd = Command(
                command_id="1",
                execution_id=1,
                step="s",
                tool_kind="postgres",
                catalog_id=1,
                input={"tool_config": {**config, "connection_string": args.dsn}, "input": {}},
            )
            for _ in range(10):
                execute(cmd, registry, timeout=60)
            took = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                outcome = execute(cmd, registry, timeout=60)
                took.append((time.perf_counter() - t0) * 1000)
                assert outcome.ok, outcome.error
            took.sort()
            p95 = took[int(len(took) * 0.95) - 1]
            print(f"{name:20} p50 {statistics.median(took):8.2f} ms  p95 {p95:8.2f} ms")
    finally:
        registry.close()
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS pgw_bench_cost")


if __name__ == "__main__":
    main()
