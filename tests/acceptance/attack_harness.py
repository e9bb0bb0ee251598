"""A worker under attack: the real CLI in a subprocess, watched from outside.

The watcher samples, every half second, what the rest of the system sees of the worker: its
``/readyz`` answer, the age of its ``noetl.runtime`` heartbeat and its peak resident memory
(``VmHWM``). An attack succeeds if any of those goes wrong while an attacking row runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from noetl_pgworker.enqueue import enqueue

from ..helpers import scalar

#: The worker's own address-space ceiling in these tests: an attack that grows the worker
#: meets it (MemoryError) instead of the machine's memory.
WORKER_ADDRESS_SPACE = 6 * 1024**3
STALE_AFTER = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE, WORKER_ADDRESS_SPACE))


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Watch:
    """What the watcher saw."""

    readyz: list[int] = field(default_factory=list)
    heartbeat_ages: list[float] = field(default_factory=list)
    peak_mb: float = 0.0


class AttackedWorker:
    """``noetl-pgworker start`` in its own session (killed whole at the end), watched."""

    def __init__(self, dsn: str, *options: str, env: dict[str, str] | None = None) -> None:
        self.dsn = dsn
        self.port = free_port()
        self.worker_id = f"attacked-{self.port}"
        args = [
            sys.executable,
            "-m",
            "noetl_pgworker",
            "start",
            "--worker-id",
            self.worker_id,
            "--metrics-port",
            str(self.port),
            "--heartbeat-interval",
            "1",
            "--stale-after",
            str(STALE_AFTER),
            "--poll-interval",
            "0.5",
            *options,
        ]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NOETL_PGWORKER_DSN": dsn, **(env or {})},
            start_new_session=True,
            preexec_fn=_cap_memory,
        )
        self.watch = Watch()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self.stderr = ""

    def readyz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.readyz() != 200:
            assert self.proc.poll() is None, f"the worker exited: {self.proc.stderr}"
            assert time.monotonic() < deadline, "the worker did not become ready"
            time.sleep(0.2)
        self._watcher.start()

    def _watch(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.wait(0.5):
                self.watch.readyz.append(self.readyz())
                age = scalar(
                    conn,
                    "SELECT EXTRACT(epoch FROM now() - heartbeat)::float8 FROM noetl.runtime"
                    " WHERE kind = 'worker_pool' AND name = %s",
                    (self.worker_id,),
                )
                if age is not None:
                    self.watch.heartbeat_ages.append(float(age))
                self.watch.peak_mb = max(self.watch.peak_mb, peak_rss_mb(self.proc.pid))

    def stop_watching(self) -> Watch:
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(30)
        self.watch.peak_mb = max(self.watch.peak_mb, peak_rss_mb(self.proc.pid))
        return self.watch

    def sigterm(self, bound: float) -> float | None:
        """SIGTERM; the seconds it took the worker to exit, or None if not within ``bound``."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, self.stderr = self.proc.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - t0

    def kill(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                _, self.stderr = self.proc.communicate(timeout=30)
        # what the worker started in sessions of its own (the fork server)
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def attacked_worker(
    dsn: str, *options: str, env: dict[str, str] | None = None
) -> Iterator[AttackedWorker]:
    worker = AttackedWorker(dsn, *options, env=env)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.kill()


def enqueue_one(
    conn: psycopg.Connection[Any], kind: str, config: dict[str, Any], step: str = "attack"
) -> int:
    return enqueue(conn, tool_kind=kind, step=step, tool_config=config).command_ids[0]


def status_of(conn: psycopg.Connection[Any], command_id: int) -> str:
    return str(
        scalar(conn, "SELECT status FROM noetl.command WHERE command_id = %s", (command_id,))
    )


def error_of(conn: psycopg.Connection[Any], command_id: int) -> str:
    return str(
        scalar(
            conn,
            "SELECT coalesce(result ->> 'error', result::text) FROM noetl.command"
            " WHERE command_id = %s",
            (command_id,),
        )
    )


def time_to_terminal(
    conn: psycopg.Connection[Any], ids: Sequence[int], limit: float
) -> dict[int, float]:
    """Seconds from each row's start (first seen RUNNING, or now if later) to its terminal
    status, polling; rows still not terminal after ``limit`` seconds are left out."""
    started: dict[int, float] = {}
    ended: dict[int, float] = {}
    t0 = time.monotonic()
    while len(ended) < len(ids) and time.monotonic() - t0 < limit:
        rows = conn.execute(
            "SELECT command_id, status FROM noetl.command WHERE command_id = ANY(%s)",
            (list(ids),),
        ).fetchall()
        now = time.monotonic()
        for command_id, status in rows:
            cid = int(command_id)
            if status in ("CLAIMED", "RUNNING"):
                started.setdefault(cid, now)
            elif status in ("COMPLETED", "FAILED", "CANCELLED") and cid not in ended:
                ended[cid] = now - started.get(cid, t0)
        time.sleep(0.1)
    return ended


def every_text(conn: psycopg.Connection[Any]) -> str:
    """Everything the worker wrote: every command's result and every event, as text."""
    parts = [
        json.dumps(r[0])
        for r in conn.execute("SELECT result FROM noetl.command WHERE result IS NOT NULL")
    ]
    parts += [r[0] for r in conn.execute("SELECT row_to_json(e)::text FROM noetl.event AS e")]
    return "\n".join(parts)
