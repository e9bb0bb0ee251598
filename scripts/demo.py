"""`make demo`: the main job, end to end, on a throwaway database.

Starts a throwaway PostgreSQL (or, with NOETL_PGWORKER_DSN set, makes a scratch database on
that server), applies the schema, enqueues a mixed workload (noop, python, python that fails
on purpose, malformed rows), runs `noetl-pgworker start --drain`, prints a summary, cleans up.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg

from noetl_pgworker import schema
from noetl_pgworker.enqueue import enqueue, ensure_catalog
from noetl_pgworker.status import format_status, read_status
from noetl_pgworker.testing import scratch_database, throwaway_postgres


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def demo_database() -> Iterator[str]:
    given = os.environ.get("NOETL_PGWORKER_DSN")
    if not given:
        say("starting a throwaway PostgreSQL")
        with throwaway_postgres() as (dsn, _cluster):
            yield dsn
        return
    say("creating a scratch database on the server of NOETL_PGWORKER_DSN")
    with scratch_database(given, prefix="noetl_pgworker_demo") as dsn:
        yield dsn


def main() -> int:
    with demo_database() as dsn:
        with psycopg.connect(dsn) as conn:
            say("applying the schema (NoETL tables + the worker's trigger and index)")
            schema.apply(conn, with_noetl_tables=True)
            conn.commit()
            say("enqueueing a mixed workload")
            enqueue(conn, tool_kind="noop", step="noop_step", count=2000, executions=20)
            enqueue(
                conn,
                tool_kind="python",
                step="double",
                tool_config={"code": "def main(x):\n    return {'doubled': x * 2}\n"},
                args={"x": 21},
                count=200,
                executions=4,
            )
            enqueue(
                conn,
                tool_kind="python",
                step="fails_on_purpose",
                tool_config={"code": "def main():\n    raise ValueError('boom')\n"},
                count=20,
            )
            catalog_id = ensure_catalog(conn)
            conn.execute(
                "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id,"
                " step_name, tool_kind, context)"
                " SELECT noetl.snowflake_id(), noetl.snowflake_id(), noetl.snowflake_id(), %s,"
                " 'malformed', 'python', '\"not an object\"'::jsonb FROM generate_series(1, 5)",
                (catalog_id,),
            )
            conn.commit()
            total = 2225
        say(f"running: noetl-pgworker start --drain --concurrency 8 ({total} commands)")
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "noetl_pgworker",
                "start",
                "--dsn",
                dsn,
                "--drain",
                "--concurrency",
                "8",
                "--worker-id",
                "demo-worker",
            ],
            check=False,
        )
        elapsed = time.monotonic() - t0
        if proc.returncode != 0:
            say(f"the worker exited with {proc.returncode}")
            return proc.returncode
        with psycopg.connect(dsn) as conn:
            st = read_status(conn, exact=True)  # a small demo database: count every row
            errors = conn.execute(
                "SELECT error, count(*) FROM noetl.command WHERE status = 'FAILED'"
                " GROUP BY error ORDER BY error"
            ).fetchall()
            events = conn.execute("SELECT count(*) FROM noetl.event").fetchone()
        print()
        print(format_status(st))
        print()
        print("FAILED commands, by error:")
        for error, n in errors:
            print(f"  {n:>5}  {error}")
        done = st.total("COMPLETED") + st.total("FAILED") + st.total("CANCELLED")
        print()
        print(
            f"{done}/{total} commands terminal, {events[0] if events else 0} event rows,"
            f" {elapsed:.2f} s wall (process start included): {done / elapsed:.0f} commands/s"
        )
        ok = done == total and st.total("COMPLETED") == 2200 and st.total("FAILED") == 25
        say("demo finished: all commands accounted for" if ok else "demo finished: MISMATCH")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
