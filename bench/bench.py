"""`make bench`: how fast noetl-pgworker drains, against how fast its own SQL can go.

Runs against NOETL_PGWORKER_DSN's server (in scratch databases it creates and drops) or a
throwaway PostgreSQL. Prints a table and writes JSON (``--out``). Scenarios:

  drain     N no-op commands enqueued first, then 1, 2, 4 worker processes (concurrency 16
            each) until all are terminal; commands/s from the database's own timestamps. Per
            command, over the drain alone: the workers' CPU time (µs), commits, statements
            (when the server has pg_stat_statements) and WAL bytes.
  ceiling   the worker's claim and write-back statements driven by a bare loop (no tools, no
            threads), 1 and 4 processes, same database, same run: the worker is reported as a
            ratio of the best of these.
  latency   an idle worker; 500 commands inserted one per transaction, 10 ms apart;
            insert (transaction start) to tool start: p50/p95/p99/max.
  history   every statement the worker and its CLI run on a schedule or per command (claim,
            reclaim, write-back, release, heartbeat, metrics sampler, status), median ms with
            10,000 PENDING rows alone, then with --history terminal commands and
            --events-per-command events each added (each run rolled back); then the claim with
            100,000 PENDING rows of a kind it does not run.
  memory    the worker's RSS idle and at the end of the 1-process drain.
  peers     the same N no-op jobs drained by PgQueuer and by Procrastinate (bench/peers/, in
            their own virtual environment, .bench/peers-venv, made on first use), one process
            each, each in its own scratch database, interleaved with a 1-process worker drain
            (worker, pgqueuer, procrastinate, 3 times); median jobs/s, the worker's ratio to
            each, and the rows each wrote per job (inserted + updated + deleted).
  python    400 python commands (--python-commands) drained by one worker, --concurrency 8, per
            --python-mode (inline, process = fork server, spawn = new interpreter), the modes
            interleaved 3 times (--python-rounds), median; an idle worker's RSS with its fork
            server; one step's p50 time per mode, sequentially.
  latency-net
            the same N no-op commands (--net-commands, 10,000) drained by one worker
            (--concurrency 8) and by PgQueuer, each through bench/delayproxy.py holding every
            chunk 0, 1, 2 and 5 ms each way (a database 0-10 ms round trip away), 3 rounds
            interleaved (--net-rounds); median commands/s and each one's ratio to its own
            0 ms rate.
  tracing   the 1-process drain with command traces off and on (OTLP/HTTP to a collector
            in this process that takes and counts what it is sent), interleaved 3 times
            (--tracing-rounds), median; commands/s and the worker's CPU per command. Not in
            the default set: needs the otel extra (`--only tracing`).

The throwaway cluster runs with PostgreSQL's default durability (fsync, synchronous_commit and
full_page_writes on). --fast-cluster also runs drain, peers and latency on a second cluster
with all three off, reported apart and labelled fsync=off.
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
from psycopg import sql

from noetl_pgworker import events, schema
from noetl_pgworker.enqueue import enqueue, ensure_catalog
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.queries import query
from noetl_pgworker.sink import PgRow as WriteItem
from noetl_pgworker.sink import write_back_params
from noetl_pgworker.testing import find_pg_bindir, scratch_database, throwaway_postgres

WORKER_ARGS = ["--concurrency", "16", "--poll-interval", "0.5", "--log-level", "warning"]
#: PostgreSQL's defaults, as a user's server runs: every commit waits for its WAL flush.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
#: --fast-cluster: no flush at all; figures of CPU and round trips, not of a real server.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
PEERS_VENV = ROOT / ".bench" / "peers-venv"
PEER_SCRIPTS = {"pgqueuer": "pgqueuer_drain.py", "procrastinate": "procrastinate_drain.py"}


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def server(settings: dict[str, str], *, given_ok: bool = True) -> Iterator[str]:
    given = os.environ.get("NOETL_PGWORKER_DSN")
    if given and given_ok:
        yield given
        return
    settings = {**settings, **statement_stats()}
    with throwaway_postgres(settings=settings) as (dsn, _cluster):
        yield dsn


def statement_stats() -> dict[str, str]:
    """The setting that loads pg_stat_statements (statements counted per command), if the
    server's binaries have it."""
    bindir = find_pg_bindir()
    if bindir is None or not (bindir / "pg_config").exists():
        return {}
    try:
        libdir = subprocess.run(
            [str(bindir / "pg_config"), "--pkglibdir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    if not (Path(libdir) / "pg_stat_statements.so").exists():
        return {}
    return {"shared_preload_libraries": "pg_stat_statements"}


@contextlib.contextmanager
def scratch_db(admin_dsn: str) -> Iterator[str]:
    """A fresh database with NoETL's tables and the worker's objects, dropped after."""
    with scratch_database(admin_dsn, prefix="pgw_bench") as dsn:
        with psycopg.connect(dsn) as conn:
            schema.apply(conn, with_noetl_tables=True)
        yield dsn


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def db_counters(dsn: str) -> dict[str, float]:
    """Commits of ``dsn``'s database, statements run in it (None without pg_stat_statements)
    and the server's WAL position, now (statistics lag up to a second: call after a pause)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit, (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"
            " FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        assert row is not None
        statements = None
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            got = conn.execute(
                "SELECT sum(calls)::bigint FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()
            statements = int(got[0] or 0) if got else None
        except psycopg.Error:
            pass  # not loaded: statements are not counted
    return {"commits": int(row[0]), "wal": int(row[1]), "statements": statements}


def per_command(
    before: dict[str, Any], after: dict[str, Any], cpu: float, n: int
) -> dict[str, Any]:
    """What the drain cost per command; ``before`` and ``after`` from :func:`db_counters`."""
    statements = (
        round((after["statements"] - before["statements"]) / n, 2)
        if after["statements"] is not None and before["statements"] is not None
        else None
    )
    return {
        "worker_cpu_us": round(cpu / n * 1e6),
        "commits": round((after["commits"] - before["commits"]) / n, 3),
        # The bench's own connections add a few (its polls): under 0.02 per command.
        "statements": statements,
        "wal_bytes": round((after["wal"] - before["wal"]) / n),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def spawn_worker(dsn: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
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
        env=env,
    )


def wait_terminal(
    conn: psycopg.Connection[Any], n: int, timeout: float, every: float = 0.05
) -> None:
    """Until ``n`` commands are terminal; a count of the table every ``every`` seconds (which
    costs the database what it costs: where the rate comes from the rows' timestamps, poll
    seldom)."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT count(*) FROM noetl.command WHERE status IN ('COMPLETED','FAILED','CANCELLED')"
        ).fetchone()
        if row and row[0] >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {row[0] if row else 0}/{n} terminal after {timeout} s")
        time.sleep(every)


def row_writes(dsn: str) -> dict[str, list[int]]:
    """Rows inserted, updated, deleted so far per table (partitions under their root) of
    ``dsn``'s database, from its statistics: call it once the writers have disconnected."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT coalesce(pg_partition_root(relid), relid)::regclass::text,"
            " sum(n_tup_ins)::bigint, sum(n_tup_upd)::bigint, sum(n_tup_del)::bigint"
            " FROM pg_stat_user_tables GROUP BY 1"
            " HAVING sum(n_tup_ins + n_tup_upd + n_tup_del) > 0 ORDER BY 1"
        ).fetchall()
    return {r[0]: [int(r[1]), int(r[2]), int(r[3])] for r in rows}


def wal_now(dsn: str) -> tuple[int, int]:
    """(WAL bytes written, WAL syncs) by the whole server so far."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, wal_sync FROM pg_stat_wal"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def wal_used(dsn: str, before: tuple[int, int], n: int) -> dict[str, float]:
    after = wal_now(dsn)
    return {
        "wal_bytes_per_job": round((after[0] - before[0]) / n),
        "wal_syncs_per_job": round((after[1] - before[1]) / n, 3),
    }


def drain(
    admin_dsn: str, n: int, processes: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    with scratch_db(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        wal0 = wal_now(dsn)
        enqueue(conn, tool_kind="noop", count=n, executions=max(1, n // 100))
        conn.execute("VACUUM ANALYZE noetl.command")
        procs = [spawn_worker(dsn, f"bench-{i}", env) for i in range(processes)]
        try:
            time.sleep(1.2)  # started, and the statistics of the enqueue reported
            idle_rss = [rss_kib(p.pid) for p in procs]
            counters0 = db_counters(dsn)
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            wait_terminal(conn, n, timeout=600)
            cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
            end_rss = [rss_kib(p.pid) for p in procs]
            time.sleep(1.2)  # the workers' statistics reported
            cost = per_command(counters0, db_counters(dsn), cpu, n)
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
        time.sleep(1.5)  # the bench's own connection reports its statistics when idle 1 s
        writes = row_writes(dsn)
        wal = wal_used(dsn, wal0, n)
    return {
        "processes": processes,
        "commands": n,
        "completed": completed,
        "seconds": round(seconds, 3),
        "commands_per_s": round(n / seconds, 1),
        "event_rows": int(evs[0]) if evs else 0,
        "rss_idle_kib": idle_rss,
        "rss_end_kib": end_rss,
        "row_writes": writes,
        **wal,
        "per_command": cost,
    }


@contextlib.contextmanager
def otlp_collector() -> Iterator[tuple[str, list[int]]]:
    """An OTLP/HTTP collector in this process: (its URL, the sizes of the requests taken)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sizes: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            sizes.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="bench-collector", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", sizes
    finally:
        httpd.shutdown()
        httpd.server_close()


def tracing_cost(admin_dsn: str, n: int, rounds: int) -> dict[str, Any]:
    """The 1-process drain with traces off and on, interleaved; medians."""
    off_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with otlp_collector() as (url, sizes):
        on_env = {**off_env, "OTEL_EXPORTER_OTLP_ENDPOINT": url}
        for round_ in range(rounds):
            for label, env in (("off", off_env), ("on", on_env)):
                say(f"tracing {label} ({round_ + 1}/{rounds})")
                runs[label].append(drain(admin_dsn, n, 1, env))
        exported = {"requests": len(sizes), "bytes": sum(sizes)}
    out: dict[str, Any] = {"commands": n, "rounds": rounds, "exported_on": exported}
    for label, rs in runs.items():
        out[label] = {
            "commands_per_s": statistics.median(r["commands_per_s"] for r in rs),
            "runs": [r["commands_per_s"] for r in rs],
            "worker_cpu_us": statistics.median(r["per_command"]["worker_cpu_us"] for r in rs),
        }
    return out


def drains(admin_dsn: str, n: int, label: str = "") -> list[dict[str, Any]]:
    """The drain with 1, 2 and 4 worker processes."""
    out = []
    for procs in (1, 2, 4):
        say(f"{label}drain, {procs} worker process(es)")
        out.append(drain(admin_dsn, n, procs))
    return out


def peers_python() -> Path:
    """The peers' virtual environment's python: made, or remade when
    bench/peers/requirements.txt changed, with ``python -m venv`` and pip."""
    python = PEERS_VENV / "bin" / "python"
    wanted = (PEERS / "requirements.txt").read_text()
    stamp = PEERS_VENV / "bench-requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    say(f"peers: installing {PEERS / 'requirements.txt'} into {PEERS_VENV}")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(PEERS / "requirements.txt")],
        check=True,
    )
    stamp.write_text(wanted)
    return python


def peer_drain(admin_dsn: str, python: Path, peer: str, n: int) -> dict[str, Any]:
    """One peer drains `n` no-op jobs in a scratch database of its own (its script enqueues
    them, then times one process draining them)."""
    with scratch_database(admin_dsn, prefix=f"pgw_bench_{peer}") as dsn:
        wal0 = wal_now(dsn)
        proc = subprocess.run(
            [str(python), str(PEERS / PEER_SCRIPTS[peer]), "--dsn", dsn, "--jobs", str(n)],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{peer} drain failed: {proc.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        time.sleep(1.5)  # the WAL writer reports its syncs on its own schedule
        out["row_writes"] = row_writes(dsn)
        out.update(wal_used(dsn, wal0, n))
    return out


def peers(admin_dsn: str, n: int, rounds: int = 3) -> dict[str, Any]:
    """The worker (1 process) and each peer drain `n` no-op jobs, interleaved `rounds` times."""
    python = peers_python()
    versions = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, json; print(json.dumps({p: m.version(p)"
            " for p in ('pgqueuer', 'procrastinate', 'asyncpg', 'psycopg', 'uvloop')}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {"noetl-pgworker": [], **{p: [] for p in PEER_SCRIPTS}}
    for r in range(1, rounds + 1):
        say(f"peers, round {r}/{rounds}: noetl-pgworker")
        d = drain(admin_dsn, n, 1)
        runs["noetl-pgworker"].append(
            {
                "jobs": n,
                "seconds": d["seconds"],
                "jobs_per_s": d["commands_per_s"],
                "row_writes": d["row_writes"],
                "wal_bytes_per_job": d["wal_bytes_per_job"],
                "wal_syncs_per_job": d["wal_syncs_per_job"],
            }
        )
        for peer in PEER_SCRIPTS:
            say(f"peers, round {r}/{rounds}: {peer}")
            runs[peer].append(peer_drain(admin_dsn, python, peer, n))
    summary = {}
    for name, rs in runs.items():
        rates = [x["jobs_per_s"] for x in rs]
        writes = statistics.median(sum(map(sum, x["row_writes"].values())) for x in rs)
        summary[name] = {
            "median_jobs_per_s": statistics.median(rates),
            "jobs_per_s": rates,
            "row_writes_per_job": round(writes / n, 2),
            "wal_bytes_per_job": statistics.median(x["wal_bytes_per_job"] for x in rs),
            "wal_syncs_per_job": statistics.median(x["wal_syncs_per_job"] for x in rs),
        }
    worker = summary["noetl-pgworker"]["median_jobs_per_s"]
    for peer in PEER_SCRIPTS:
        summary[peer]["worker_ratio"] = round(worker / summary[peer]["median_jobs_per_s"], 2)
    return {
        "jobs": n,
        "rounds": rounds,
        "versions": json.loads(versions.stdout),
        "summary": summary,
        "runs": runs,
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
                    {
                        "limit": batch,
                        "tool_kinds": ["noop"],
                        "worker_id": worker_id,
                        "session_locks": True,
                    },
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


# What the history scenario times: every statement the worker or its CLI runs on a schedule
# or per command. `ended_check` is the claim's look for a terminal event of the candidates'
# executions, alone; `status_counts` is `status --exact` (a full count, by design).
HISTORY_STATEMENTS = (
    "claim_commands",
    "ended_check",
    "reclaim_commands",
    "write_back",
    "release_commands",
    "held_commands",
    "runtime_heartbeat",
    "queue_depth",
    "status_stuck",
    "status_oldest_pending",
    "status_history_estimate",
    "status_workers",
    "status_counts",
)
ENDED_CHECK = (
    "SELECT k.execution_id, (SELECT e.event_type FROM noetl.event AS e"
    " WHERE e.execution_id = k.execution_id AND e.event_type IN ('playbook.completed',"
    " 'playbook.failed', 'workflow.completed', 'workflow.failed', 'execution.cancelled')"
    " LIMIT 1) FROM unnest(%(execution_ids)s::bigint[]) AS k(execution_id)"
)
PROBE_KINDS = ["noop", "python"]


def _live_set(conn: psycopg.Connection[Any], pending: int) -> list[Command]:
    """The same live rows in both phases: `pending` PENDING no-op commands, 40 RUNNING commands
    of a dead worker (for the reclaim), and 16 commands claimed by worker `w`."""
    enqueue(conn, tool_kind="noop", count=pending, executions=max(1, pending // 100))
    enqueue(conn, tool_kind="python", count=40, executions=4)
    conn.execute(
        "UPDATE noetl.command SET status = 'RUNNING', worker_id = 'dead',"
        " claimed_at = now() - interval '1 hour' WHERE tool_kind = 'python'"
    )
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            query("claim_commands"),
            {"limit": 16, "tool_kinds": ["noop"], "worker_id": "w", "session_locks": True},
        )
        cols = [d.name for d in cur.description or []]
        return [
            Command.from_row(dict(zip(cols, r, strict=True)))
            for r in cur.fetchall()
            if r[1] is not None
        ]


def _history_params(held: list[Command], live: int) -> dict[str, Any]:
    items = []
    for cmd in held:
        ref, out_ = cmd.ref, Outcome.success({"status": "noop", "step": cmd.ref.step})
        evs = [events.started_event(ref, "w")]
        evs += events.finished_events(ref, out_, "w", row_limit=1 << 20)
        items.append(
            WriteItem(ref, "COMPLETED", None, events.row_result(ref, out_, "w", 1 << 20), None, evs)
        )
    ids = {
        "items": events.dumps(
            [{"execution_id": c.ref.execution_id, "command_id": c.ref.command_id} for c in held]
        ),
        "worker_id": "w",
        "execution_ids": sorted({c.ref.execution_id for c in held}),
        "command_ids": [c.ref.command_id for c in held],
    }
    return {
        "claim_commands": {
            "limit": 16,
            "tool_kinds": PROBE_KINDS,
            "worker_id": "probe",
            "session_locks": True,
        },
        "ended_check": {"execution_ids": ids["execution_ids"]},
        "reclaim_commands": {
            "limit": 16,
            "tool_kinds": PROBE_KINDS,
            "worker_id": "w",
            "known": ids["command_ids"],
            "lease": 120,
            "stale_after": 30,
            "max_attempts": 3,
            "session_locks": True,
        },
        "write_back": write_back_params(items, "w"),
        "release_commands": ids,
        "held_commands": ids,
        "runtime_heartbeat": {
            "name": "w",
            "labels": "{}",
            "capabilities": "{}",
            "capacity": 16,
            "runtime": "{}",
        },
        "queue_depth": {},
        "status_stuck": {"lease": 120},
        "status_oldest_pending": {},
        "status_history_estimate": {"live": live},
        "status_workers": {},
        "status_counts": {},
    }


def _time_statements(dsn: str, params: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median ms per statement after 10 untimed runs; each run is rolled back, so the tables
    stay as they are."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for name in HISTORY_STATEMENTS:
            stmt = sql.SQL(ENDED_CHECK) if name == "ended_check" else query(name)
            n = 5 if name == "status_counts" else rounds
            times = []
            for i in range(n + (0 if name == "status_counts" else 10)):
                t0 = time.perf_counter()
                cur = conn.execute(stmt, params[name])
                if cur.description is not None:
                    cur.fetchall()
                if i >= 10 or name == "status_counts":  # 10 warm-up runs (caches, prepare)
                    times.append(time.perf_counter() - t0)
                conn.rollback()
            out[name] = round(statistics.median(times) * 1000, 3)
    return out


def load_history(
    conn: psycopg.Connection[Any], commands: int, events_per_command: int
) -> dict[str, float]:
    """`commands` terminal commands (5 per execution) and `events_per_command` events each
    (one per execution a playbook.completed), one INSERT ... SELECT per table; then VACUUM
    ANALYZE, as autovacuum would have done over the months the history took."""
    catalog = ensure_catalog(conn)
    conn.execute("SET synchronous_commit = off")
    took = {}
    t0 = time.perf_counter()
    conn.execute(
        "INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id, step_name,"
        " tool_kind, status, attempt, context, meta, result, worker_id, claimed_at, started_at,"
        " completed_at, created_at, updated_at)"
        " SELECT g, g, 1000 + g / 5, %s, 'step_' || g %% 5,"
        " (ARRAY['noop','python','http','postgres','duckdb'])[g %% 5 + 1],"
        " CASE WHEN g %% 50 = 7 THEN 'FAILED' WHEN g %% 100 = 9 THEN 'CANCELLED'"
        " ELSE 'COMPLETED' END, 1, '{\"input\": {}}', '{\"actionable\": true}',"
        " '{\"status\": \"COMPLETED\"}', 'old-worker', t, t, t, t, t"
        " FROM generate_series(1, %s) AS g,"
        " LATERAL (SELECT now() - interval '90 days' + g * interval '500 us') AS x(t)",
        (catalog, commands),
    )
    took["commands_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    epc = events_per_command
    conn.execute(
        "INSERT INTO noetl.event (execution_id, catalog_id, event_id, created_at, event_type,"
        " node_id, node_name, status, result, worker_id, command_id)"
        " SELECT 1000 + g / (5 * %(epc)s), %(catalog)s, g,"
        " (now() - interval '90 days')::timestamp + g * interval '100 us',"
        " CASE WHEN g %% (5 * %(epc)s) = 5 * %(epc)s - 1 THEN 'playbook.completed'"
        " ELSE (ARRAY['command.issued','command.claimed','command.started','call.done',"
        " 'command.completed'])[g %% 5 + 1] END, 'step', 'step', 'COMPLETED',"
        " '{\"status\": \"COMPLETED\"}', 'old-worker', g / %(epc)s"
        " FROM generate_series(5 * %(epc)s, (%(n)s + 5) * %(epc)s - 1) AS g",
        {"epc": epc, "catalog": catalog, "n": commands},
    )
    took["events_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    conn.execute("VACUUM ANALYZE noetl.command")
    conn.execute("VACUUM ANALYZE noetl.event")
    took["vacuum_analyze_s"] = round(time.perf_counter() - t0, 1)
    return took


def history(
    admin_dsn: str, commands: int, events_per_command: int, pending: int, rounds: int = 100
) -> dict[str, Any]:
    """Each statement with the live set alone, then with `commands` rows of history added to
    the same database; then the claim with 100,000 PENDING rows of another kind added."""
    with scratch_db(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        held = _live_set(conn, pending)
        conn.execute("VACUUM ANALYZE noetl.command, noetl.event")
        live = pending + 40  # PENDING (16 of them claimed by w) and the dead worker's RUNNING
        params = _history_params(held, live)
        say("history: timing with no history")
        empty = _time_statements(dsn, params, rounds)
        say(f"history: loading {commands:,} commands, {events_per_command} events each")
        took = load_history(conn, commands, events_per_command)
        say(f"history: loaded in {took}; timing")
        full = _time_statements(dsn, params, rounds)
        say("history: 100,000 PENDING rows of a kind the probe does not claim")
        enqueue(conn, tool_kind="http", count=100_000, executions=1000)
        conn.execute(
            "UPDATE noetl.command SET created_at = created_at - interval '1 day'"
            " WHERE tool_kind = 'http' AND status = 'PENDING'"
        )
        conn.execute("ANALYZE noetl.command")
        other = _time_statements(dsn, params, rounds)["claim_commands"]
        sizes = conn.execute(
            "SELECT pg_size_pretty((SELECT sum(pg_total_relation_size(relid))"
            " FROM pg_partition_tree('noetl.command'))),"
            " pg_size_pretty((SELECT sum(pg_total_relation_size(relid))"
            " FROM pg_partition_tree('noetl.event')))"
        ).fetchone()
        rows = conn.execute(
            "SELECT (SELECT count(*) FROM noetl.command), (SELECT count(*) FROM noetl.event)"
        ).fetchone()
    return {
        "history_commands": commands,
        "events_per_command": events_per_command,
        "pending_rows": pending,
        "rows": {"command": rows[0], "event": rows[1]} if rows else {},
        "sizes": {"command": sizes[0], "event": sizes[1]} if sizes else {},
        "load_seconds": took,
        "rounds": rounds,
        "ms_empty": empty,
        "ms_history": full,
        "ratio": {k: round(full[k] / empty[k], 2) for k in HISTORY_STATEMENTS},
        "claim_ms_other_kinds_backlog": other,
        "claim_ratio_other_kinds_backlog": round(other / full["claim_commands"], 2),
    }


PY_STEP = 'def main(x):\n    return {"y": x * 2}\n'


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


PYTHON_MODES = ("inline", "process", "spawn")


def python_drain(admin_dsn: str, n: int, mode: str) -> dict[str, Any]:
    """N python commands, one worker, --concurrency 8, --python-mode MODE."""
    with scratch_db(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="python", tool_config={"code": PY_STEP}, args={"x": 21}, count=n)
        conn.execute("VACUUM ANALYZE noetl.command")
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn),
                *("--worker-id", f"bench-py-{mode}", "--concurrency", "8"),
                *("--poll-interval", "0.5", "--tool-kinds", "python"),
                *("--python-mode", mode, "--log-level", "warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_terminal(conn, n, timeout=600)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                say(f"worker exited {proc.returncode}: {err.decode()[-500:]}")
        row = conn.execute(
            "SELECT EXTRACT(epoch FROM max(completed_at) - min(claimed_at)),"
            " count(*) FILTER (WHERE status = 'COMPLETED') FROM noetl.command"
        ).fetchone()
        assert row is not None
    return {
        "mode": mode,
        "commands": n,
        "completed": int(row[1]),
        "commands_per_s": round(n / float(row[0]), 1),
    }


def python_idle(admin_dsn: str, rounds: int = 300) -> dict[str, Any]:
    """An idle worker: its RSS and its fork server's once started; and the time one python
    step takes on the tool path, sequentially, inline and isolated (p50)."""
    from noetl_pgworker.dispatcher import execute
    from noetl_pgworker.tools import default_registry

    with scratch_db(admin_dsn) as dsn:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn),
                *("--worker-id", "bench-py-idle", "--tool-kinds", "python,noop"),
                *("--log-level", "warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(2.0)
            helpers = _children(proc.pid)
            rss = {"worker": rss_kib(proc.pid), "fork_server": sum(map(rss_kib, helpers))}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    step = Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind="python",
        catalog_id=1,
        input={"tool_config": {"code": PY_STEP}, "input": {"x": 21}},
    )
    p50: dict[str, float] = {}
    for mode in ("inline", "process", "spawn"):
        registry = default_registry(python_mode=mode)
        try:
            registry.start()
            for _ in range(20):
                execute(step, registry)
            times = []
            for _ in range(rounds if mode != "spawn" else rounds // 10):
                t0 = time.perf_counter()
                out = execute(step, registry)
                times.append((time.perf_counter() - t0) * 1000)
                assert out.ok, out.error
            p50[mode] = round(statistics.median(times), 2)
        finally:
            registry.close()
    return {
        "rss_kib": rss,
        "rss_total_mib": round((rss["worker"] + rss["fork_server"]) / 1024, 1),
        "step_p50_ms": p50,
        "overhead_p50_ms": round(p50["process"] - p50["inline"], 2),
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
    parser.add_argument("--events-per-command", type=int, default=5)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=[
            "drain",
            "ceiling",
            "latency",
            "history",
            "python",
            "peers",
            "latency-net",
            "tracing",
        ],
    )
    parser.add_argument(
        "--fast-cluster",
        action="store_true",
        help="also run drain, peers and latency on a throwaway cluster with fsync,"
        " synchronous_commit and full_page_writes off (reported apart)",
    )
    parser.add_argument("--python-commands", type=int, default=400)
    parser.add_argument("--python-rounds", type=int, default=3)
    parser.add_argument("--net-commands", type=int, default=10000)
    parser.add_argument("--net-rounds", type=int, default=3)
    parser.add_argument("--tracing-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(".bench/results.json"))
    args = parser.parse_args()
    wanted = set(args.only or ["drain", "ceiling", "latency", "history", "peers"])
    report: dict[str, Any] = {"command": " ".join(sys.argv), "started": time.strftime("%F %T")}
    with server(DURABLE) as admin:
        report["machine"] = machine(admin)
        if "ceiling" in wanted:
            report["ceiling"] = []
            for procs in (1, 4):
                say(f"ceiling, {procs} loop process(es)")
                report["ceiling"].append(ceiling(admin, args.commands, procs))
        if "drain" in wanted:
            report["drain"] = drains(admin, args.commands)
        if "latency" in wanted:
            say("latency")
            report["latency"] = latency(admin)
        if "python" in wanted:
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in PYTHON_MODES}
            for round_ in range(args.python_rounds):
                for mode in PYTHON_MODES:
                    say(f"python drain, --python-mode {mode} ({round_ + 1}/{args.python_rounds})")
                    runs[mode].append(python_drain(admin, args.python_commands, mode))
            report["python"] = {
                "drain": [
                    {
                        **runs[m][0],
                        "commands_per_s": statistics.median(r["commands_per_s"] for r in runs[m]),
                        "runs": [r["commands_per_s"] for r in runs[m]],
                    }
                    for m in PYTHON_MODES
                ]
            }
            say("python, idle worker")
            report["python"]["idle"] = python_idle(admin)
        if "history" in wanted:
            say("history")
            report["history"] = history(admin, args.history, args.events_per_command, 10_000)
        if "peers" in wanted:
            say("peers")
            report["peers"] = peers(admin, args.commands)
        if "latency-net" in wanted:
            report["latency_net"] = latency_net(admin, args.net_commands, args.net_rounds)
        if "tracing" in wanted:
            report["tracing"] = tracing_cost(admin, args.commands, args.tracing_rounds)
    if args.fast_cluster and wanted & {"drain", "peers", "latency"}:
        with server(FAST, given_ok=False) as fast_admin:
            fast: dict[str, Any] = {"machine": machine(fast_admin)}
            if "drain" in wanted:
                fast["drain"] = drains(fast_admin, args.commands, "fsync=off cluster: ")
            if "peers" in wanted:
                say("fsync=off cluster: peers")
                fast["peers"] = peers(fast_admin, args.commands)
            if "latency" in wanted:
                say("fsync=off cluster: latency")
                fast["latency"] = latency(fast_admin)
        report["fast_cluster"] = fast
    best = max((c["commands_per_s"] for c in report.get("ceiling", [])), default=None)
    print_table(report, best)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    say(f"results written to {args.out}")
    return 0


NET_DELAYS_MS = (0, 1, 2, 5)


@contextlib.contextmanager
def delay_proxy(dsn: str, delay_ms: float) -> Iterator[str]:
    """``dsn`` through bench/delayproxy.py holding each chunk ``delay_ms`` each way."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    upstream = f"{params.get('host') or '127.0.0.1'}:{params.get('port') or 5432}"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "delayproxy.py"), "--upstream", upstream,
         "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(port))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def net_worker_drain(admin_dsn: str, n: int, delay_ms: float) -> float:
    """One worker (--concurrency 8) drains ``n`` no-op commands through the proxy; commands/s."""
    with scratch_db(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        enqueue(conn, tool_kind="noop", count=n, executions=max(1, n // 100))
        conn.execute("VACUUM ANALYZE noetl.command")
        with delay_proxy(dsn, delay_ms) as far:
            args = [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", far,
                    "--worker-id", "bench-net", "--concurrency", "8", "--poll-interval", "0.5",
                    "--log-level", "warning"]  # fmt: skip
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                # The rate comes from the rows' timestamps: counting the table 20 times a
                # second would only take the database's time from the worker.
                wait_terminal(conn, n, timeout=900, every=0.5)
            finally:
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=120)
                if proc.returncode != 0:
                    say(f"worker exited {proc.returncode}: {err.decode()[-500:]}")
        row = conn.execute(
            "SELECT EXTRACT(epoch FROM max(completed_at) - min(claimed_at)) FROM noetl.command"
        ).fetchone()
        assert row is not None
        return round(n / float(row[0]), 1)


def net_peer_drain(admin_dsn: str, python: Path, n: int, delay_ms: float) -> float:
    """PgQueuer drains ``n`` no-op jobs through the proxy (bench/peers/); jobs/s."""
    with scratch_database(admin_dsn, prefix="pgw_bench_pgqueuer") as dsn:
        with delay_proxy(dsn, delay_ms) as far:
            proc = subprocess.run(
                [str(python), str(PEERS / PEER_SCRIPTS["pgqueuer"]), "--dsn", far,
                 "--jobs", str(n)],
                capture_output=True, text=True, timeout=3600, check=False,
            )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"pgqueuer drain failed: {proc.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return float(out["jobs_per_s"])


def latency_net(admin_dsn: str, n: int, rounds: int) -> dict[str, Any]:
    """The worker and PgQueuer through the delay proxy at each of NET_DELAYS_MS, ``rounds``
    times interleaved (delay by delay, the worker then PgQueuer); the median of each."""
    python = peers_python()
    runs: dict[float, dict[str, list[float]]] = {
        d: {"noetl-pgworker": [], "pgqueuer": []} for d in NET_DELAYS_MS
    }
    for round_ in range(rounds):
        for delay in NET_DELAYS_MS:
            say(f"latency-net ({round_ + 1}/{rounds}), +{delay} ms each way: noetl-pgworker")
            runs[delay]["noetl-pgworker"].append(net_worker_drain(admin_dsn, n, delay))
            say(f"latency-net ({round_ + 1}/{rounds}), +{delay} ms each way: pgqueuer")
            runs[delay]["pgqueuer"].append(net_peer_drain(admin_dsn, python, n, delay))
    rows: list[dict[str, Any]] = []
    for delay in NET_DELAYS_MS:
        row: dict[str, Any] = {"delay_ms": delay}
        for name, rates in runs[delay].items():
            row[name] = statistics.median(rates)
            row[f"{name}_runs"] = rates
        rows.append(row)
    for name in ("noetl-pgworker", "pgqueuer"):
        base = rows[0][name]
        for r in rows:
            r[f"{name}_ratio"] = round(r[name] / base, 2) if base else None
    return {"commands": n, "concurrency": 8, "rounds": rounds, "rows": rows}


def print_latency_net(net: dict[str, Any]) -> None:
    for r in net["rows"]:
        runs = {
            name: " · ".join(f"{x:.0f}" for x in r.get(f"{name}_runs", []))
            for name in ("noetl-pgworker", "pgqueuer")
        }
        worker, peer = "noetl-pgworker", "pgqueuer"
        print(
            f"latency-net +{r['delay_ms']} ms each way  {worker}"
            f" {r[worker]:>7.0f}/s ({r[worker + '_ratio']:.0%}; {runs[worker]})"
            f"  {peer} {r[peer]:>7.0f}/s ({r[peer + '_ratio']:.0%}; {runs[peer]})"
        )


def print_table(report: dict[str, Any], best: float | None) -> None:
    m = report["machine"]
    print(
        f"machine: {m['cpus']} cpus, Python {m['python']}, PostgreSQL {m['postgres']}"
        f" {m['postgres_settings']}"
    )
    for c in report.get("ceiling", []):
        print(f"ceiling  {c['processes']} loop(s)   {c['commands_per_s']:>9.0f} commands/s")
    print_drain(report.get("drain", []), best)
    if "peers" in report:
        print_peers(report["peers"])
    if "fast_cluster" in report:
        fast = report["fast_cluster"]
        print(f"fsync=off cluster: {fast['machine']['postgres_settings']}")
        print_drain(fast.get("drain", []), None, "fsync=off ")
        if "peers" in fast:
            print_peers(fast["peers"], "fsync=off ")
    for label, lat in (
        ("", report.get("latency")),
        ("fsync=off ", report.get("fast_cluster", {}).get("latency")),
    ):
        if lat:
            print(
                f"{label}latency  p50 {lat['p50_ms']} ms  p95 {lat['p95_ms']} ms"
                f"  p99 {lat['p99_ms']} ms  max {lat['max_ms']} ms"
            )
    if "latency_net" in report:
        print_latency_net(report["latency_net"])
    if "python" in report:
        py = report["python"]
        rates = {d["mode"]: d["commands_per_s"] for d in py["drain"]}
        for d in py["drain"]:
            print(
                f"python   {d['mode']:<8} {d['commands_per_s']:>9.0f} commands/s"
                f"  {d['commands_per_s'] / rates['inline']:.0%} of inline"
                f"  (median of {d.get('runs', [])})"
            )
        idle = py["idle"]
        print(
            f"python   step p50 {idle['step_p50_ms']} ms; isolated overhead"
            f" {idle['overhead_p50_ms']} ms; idle RSS worker + fork server"
            f" {idle['rss_total_mib']} MiB"
        )
    if "tracing" in report:
        t = report["tracing"]
        off, on = t["off"], t["on"]
        ratio = on["commands_per_s"] / off["commands_per_s"]
        print(
            f"tracing  off {off['commands_per_s']:.0f} commands/s, {off['worker_cpu_us']} µs CPU;"
            f" on {on['commands_per_s']:.0f} commands/s ({ratio:.0%}),"
            f" {on['worker_cpu_us']} µs CPU /command (median of {t['rounds']}: {off['runs']} /"
            f" {on['runs']}; {t['exported_on']['requests']} OTLP requests,"
            f" {t['exported_on']['bytes']:,} B)"
        )
    if "history" in report:
        h = report["history"]
        print(
            f"history  {h['history_commands']:,} terminal commands, {h['rows'].get('event', 0):,}"
            f" event rows ({h['sizes']}), loaded in {h['load_seconds']}"
        )
        print(f"         {'statement':<24} {'no history':>11} {'history':>9}  ratio")
        for name, ratio in h["ratio"].items():
            print(
                f"         {name:<24} {h['ms_empty'][name]:>8.3f} ms {h['ms_history'][name]:>6.3f}"
                f" ms  {ratio}x"
            )
        print(
            f"         claim with 100,000 PENDING of another kind: "
            f"{h['claim_ms_other_kinds_backlog']} ms ({h['claim_ratio_other_kinds_backlog']}x)"
        )


def print_drain(drains: list[dict[str, Any]], best: float | None, label: str = "") -> None:
    for d in drains:
        ratio = f"{d['commands_per_s'] / best:.0%} of ceiling" if best else ""
        writes = sum(map(sum, d["row_writes"].values())) / d["commands"]
        print(
            f"{label}drain    {d['processes']} worker(s) {d['commands_per_s']:>9.0f} commands/s"
            f"  {ratio}  rss idle {max(d['rss_idle_kib']) // 1024} MiB,"
            f" end {max(d['rss_end_kib']) // 1024} MiB, {writes:.1f} row writes,"
            f" {d['wal_bytes_per_job']} B WAL, {d['wal_syncs_per_job']} WAL syncs /command"
        )
        c = d.get("per_command")
        if c:
            print(
                f"{label}         per command, drain only: worker CPU {c['worker_cpu_us']} µs,"
                f" {c['commits']} commits, {c['statements']} statements, {c['wal_bytes']} B WAL"
            )


def print_peers(p: dict[str, Any], label: str = "") -> None:
    print(
        f"{label}peers    {p['jobs']:,} no-op jobs, one process each, median of {p['rounds']}"
        f" interleaved runs ({', '.join(f'{k} {v}' for k, v in p['versions'].items())})"
    )
    for name, s in p["summary"].items():
        ratio = f"worker {s['worker_ratio']:.2f}x" if "worker_ratio" in s else ""
        print(
            f"         {name:<15} {s['median_jobs_per_s']:>7.0f} jobs/s  {ratio:<13}"
            f" {s['row_writes_per_job']:>5.1f} row writes, {s['wal_bytes_per_job']:>6.0f} B WAL,"
            f" {s['wal_syncs_per_job']:.3f} WAL syncs /job  runs {s['jobs_per_s']}"
        )


if __name__ == "__main__":
    sys.exit(main())
