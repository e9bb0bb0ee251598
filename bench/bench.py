"""`make bench`: how fast noetl-pgworker drains, against how fast its own SQL can go.

Runs against NOETL_PGWORKER_DSN's server (in scratch databases it creates and drops) or a
throwaway PostgreSQL. Prints a table and writes JSON (``--out``). Scenarios:

  drain     N no-op commands enqueued first, then 1, 2, 4 worker processes (concurrency 16
            each) until all are terminal; commands/s from the database's own timestamps.
  ceiling   the worker's claim and write-back statements driven by a bare loop (no tools, no
            threads), 1 and 4 processes, same database, same run: the worker is reported as a
            ratio of the best of these.
  latency   an idle worker; 500 commands inserted one per transaction, 10 ms apart;
            insert (transaction start) to tool start: p50/p95/p99/max.
  backlog   the claim statement with 1,000,000 terminal rows + 10,000 pending, against 10,000
            pending alone (each claim rolled back, so the table stays as it is).
  memory    the worker's RSS idle and at the end of the 1-process drain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from noetl_pgworker import events, schema
from noetl_pgworker.enqueue import enqueue, ensure_catalog
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.queries import query
from noetl_pgworker.reporter import WriteItem, write_back_params
from noetl_pgworker.testing import scratch_database, throwaway_postgres

WORKER_ARGS = ["--concurrency", "16", "--poll-interval", "0.5", "--log-level", "warning"]


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def server() -> Iterator[str]:
    given = os.environ.get("NOETL_PGWORKER_DSN")
    if given:
        yield given
        return
    with throwaway_postgres() as (dsn, _cluster):
        yield dsn


@contextlib.contextmanager
def scratch_db(admin_dsn: str) -> Iterator[str]:
    """A fresh database with NoETL's tables and the worker's objects, dropped after."""
    with scratch_database(admin_dsn, prefix="pgw_bench") as dsn:
        with psycopg.connect(dsn) as conn:
            schema.apply(conn, with_noetl_tables=True)
        yield dsn


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def spawn_worker(dsn: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "noetl_pgworker",
            "start",
            "--dsn",
            dsn,
            "--worker-id",
            name,
            *WORKER_ARGS,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_terminal(conn: psycopg.Connection[Any], n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT count(*) FROM noetl.command WHERE status IN ('COMPLETED','FAILED','CANCELLED')"
        ).fetchone()
        if row and row[0] >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {row[0] if row else 0}/{n} terminal after {timeout} s")
        time.sleep(0.05)


def drain(admin_dsn: str, n: int, processes: int) -> dict[str, Any]:
    with scratch_db(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="noop", count=n, executions=max(1, n // 100))
        conn.execute("VACUUM ANALYZE noetl.command")
        procs = [spawn_worker(dsn, f"bench-{i}") for i in range(processes)]
        try:
            time.sleep(1.0)
            idle_rss = [rss_kib(p.pid) for p in procs]
            wait_terminal(conn, n, timeout=600)
            end_rss = [rss_kib(p.pid) for p in procs]
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                _, err = p.communicate(timeout=60)
                if p.returncode != 0:
                    say(f"worker exited {p.returncode}: {err.decode()[-500:]}")
        row = conn.execute(
            "SELECT EXTRACT(epoch FROM max(completed_at) - min(claimed_at)),"
            " count(*) FILTER (WHERE status = 'COMPLETED') FROM noetl.command"
        ).fetchone()
        assert row is not None
        seconds, completed = float(row[0]), int(row[1])
        evs = conn.execute("SELECT count(*) FROM noetl.event").fetchone()
    return {
        "processes": processes,
        "commands": n,
        "completed": completed,
        "seconds": round(seconds, 3),
        "commands_per_s": round(n / seconds, 1),
        "event_rows": int(evs[0]) if evs else 0,
        "rss_idle_kib": idle_rss,
        "rss_end_kib": end_rss,
    }


def _ceiling_loop(dsn: str, worker_id: str, batch: int, out: Any) -> None:
    """Claim `batch`, write back `batch` with the full event trail, repeat: no tool, no thread."""
    done = 0
    with psycopg.connect(dsn) as conn:
        t0 = time.perf_counter()
        while True:
            with conn.cursor() as cur:
                cur.execute(
                    query("claim_commands"),
                    {"limit": batch, "tool_kinds": ["noop"], "worker_id": worker_id},
                )
                rows = [r for r in cur.fetchall() if r[1] is not None]
                conn.commit()
                if not rows:
                    break
                cols = [d.name for d in cur.description or []]
                items = []
                for r in rows:
                    ref = Command.from_row(dict(zip(cols, r, strict=True))).ref
                    out_ = Outcome.success({"status": "noop", "step": ref.step})
                    evs = [events.started_event(ref, worker_id)]
                    evs += events.finished_events(ref, out_, worker_id, row_limit=1 << 20)
                    items.append(
                        WriteItem(
                            ref,
                            "COMPLETED",
                            None,
                            events.row_result(ref, out_, worker_id, 1 << 20),
                            None,
                            evs,
                        )
                    )
                cur.execute(query("write_back"), write_back_params(items, worker_id))
                conn.commit()
                done += len(rows)
        out.put((done, time.perf_counter() - t0))


def ceiling(admin_dsn: str, n: int, processes: int, batch: int = 50) -> dict[str, Any]:
    with scratch_db(admin_dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            enqueue(conn, tool_kind="noop", count=n, executions=max(1, n // 100))
            conn.execute("VACUUM ANALYZE noetl.command")
        q: Any = multiprocessing.Queue()
        procs = [
            multiprocessing.Process(target=_ceiling_loop, args=(dsn, f"loop-{i}", batch, q))
            for i in range(processes)
        ]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results = [q.get(timeout=600) for _ in procs]
        wall = time.perf_counter() - t0
        for p in procs:
            p.join(30)
    done = sum(r[0] for r in results)
    return {
        "processes": processes,
        "batch": batch,
        "commands": done,
        "seconds": round(wall, 3),
        "commands_per_s": round(done / wall, 1),
    }


def latency(admin_dsn: str, n: int = 500) -> dict[str, Any]:
    with scratch_db(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        proc = spawn_worker(dsn, "bench-latency")
        try:
            time.sleep(1.5)
            catalog = ensure_catalog(conn)
            for _ in range(n):
                conn.execute(
                    query("enqueue_commands"),
                    {
                        "catalog_id": catalog,
                        "tool_kind": "noop",
                        "step": "ping",
                        "context": "{}",
                        "count": 1,
                        "executions": 1,
                        "execution_id": None,
                        "max_attempts": 3,
                    },
                )
                time.sleep(0.01)
            wait_terminal(conn, n, timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        delays = [
            float(r[0]) * 1000
            for r in conn.execute(
                "SELECT EXTRACT(epoch FROM started_at - created_at) FROM noetl.command"
            )
        ]
    delays.sort()

    def pct(p: float) -> float:
        return round(delays[min(len(delays) - 1, int(p * len(delays)))], 2)

    return {
        "commands": n,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": round(delays[-1], 2),
        "mean_ms": round(statistics.mean(delays), 2),
    }


def _claim_ms(dsn: str, rounds: int = 200) -> float:
    with psycopg.connect(dsn) as conn:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            conn.execute(
                query("claim_commands"), {"limit": 16, "tool_kinds": ["noop"], "worker_id": "probe"}
            ).fetchall()
            times.append(time.perf_counter() - t0)
            conn.rollback()
    return statistics.median(times) * 1000


def backlog(admin_dsn: str, history: int, pending: int) -> dict[str, Any]:
    results = {}
    for label, hist in (("empty", 0), ("history", history)):
        with scratch_db(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
            if hist:
                catalog = ensure_catalog(conn)
                conn.execute(
                    "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id,"
                    " step_name, tool_kind, status, context, meta, worker_id, claimed_at,"
                    " started_at, completed_at, created_at)"
                    " SELECT noetl.snowflake_id(), noetl.snowflake_id(), (g %% 5000) + 1, %s, 's',"
                    " 'noop', 'COMPLETED', '{}', '{}', 'old', now(), now(), now(),"
                    " now() - interval '1 day' FROM generate_series(1, %s) g",
                    (catalog, hist),
                )
            enqueue(conn, tool_kind="noop", count=pending, executions=max(1, pending // 100))
            conn.execute("VACUUM ANALYZE noetl.command")
            results[label] = round(_claim_ms(dsn), 3)
    return {
        "history_rows": history,
        "pending_rows": pending,
        "claim_ms_empty": results["empty"],
        "claim_ms_history": results["history"],
        "slowdown": round(results["history"] / results["empty"], 2),
    }


def machine(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings"
                " WHERE name IN ('fsync', 'synchronous_commit',"
                " 'shared_buffers', 'full_page_writes', 'max_connections')"
            ).fetchall()
        )
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": version[0] if version else "?",
        "postgres_settings": settings,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=50_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument(
        "--only", nargs="*", default=None, choices=["drain", "ceiling", "latency", "backlog"]
    )
    parser.add_argument("--out", type=Path, default=Path(".bench/results.json"))
    args = parser.parse_args()
    wanted = set(args.only or ["drain", "ceiling", "latency", "backlog"])
    report: dict[str, Any] = {"command": " ".join(sys.argv), "started": time.strftime("%F %T")}
    with server() as admin:
        report["machine"] = machine(admin)
        if "ceiling" in wanted:
            report["ceiling"] = []
            for procs in (1, 4):
                say(f"ceiling, {procs} loop process(es)")
                report["ceiling"].append(ceiling(admin, args.commands, procs))
        if "drain" in wanted:
            report["drain"] = []
            for procs in (1, 2, 4):
                say(f"drain, {procs} worker process(es)")
                report["drain"].append(drain(admin, args.commands, procs))
        if "latency" in wanted:
            say("latency")
            report["latency"] = latency(admin)
        if "backlog" in wanted:
            say("backlog")
            report["backlog"] = backlog(admin, args.history, 10_000)
    best = max((c["commands_per_s"] for c in report.get("ceiling", [])), default=None)
    print_table(report, best)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    say(f"results written to {args.out}")
    return 0


def print_table(report: dict[str, Any], best: float | None) -> None:
    m = report["machine"]
    print(
        f"machine: {m['cpus']} cpus, Python {m['python']}, PostgreSQL {m['postgres']}"
        f" {m['postgres_settings']}"
    )
    for c in report.get("ceiling", []):
        print(f"ceiling  {c['processes']} loop(s)   {c['commands_per_s']:>9.0f} commands/s")
    for d in report.get("drain", []):
        ratio = f"{d['commands_per_s'] / best:.0%} of ceiling" if best else ""
        print(
            f"drain    {d['processes']} worker(s) {d['commands_per_s']:>9.0f} commands/s  {ratio}"
            f"  rss idle {max(d['rss_idle_kib']) // 1024} MiB,"
            f" end {max(d['rss_end_kib']) // 1024} MiB"
        )
    if "latency" in report:
        lat = report["latency"]
        print(
            f"latency  p50 {lat['p50_ms']} ms  p95 {lat['p95_ms']} ms  p99 {lat['p99_ms']} ms"
            f"  max {lat['max_ms']} ms"
        )
    if "backlog" in report:
        b = report["backlog"]
        print(
            f"backlog  claim {b['claim_ms_empty']} ms empty, {b['claim_ms_history']} ms with"
            f" {b['history_rows']:,} terminal rows: {b['slowdown']}x"
        )


if __name__ == "__main__":
    sys.exit(main())
