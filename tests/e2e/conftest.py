"""The e2e tier: real playbooks on a real, already running NoETL server.

Collected only when ``NOETL_E2E_SERVER_URL`` and ``NOETL_E2E_DSN`` are set (the server and its
database, with the worker's schema applied) **and** this directory is named on the command line
(``make e2e`` does both), so ``make test`` never runs it. Nothing here builds, installs or
starts NoETL: the tests talk to the server by URL and read its tables.

Each test registers its playbook (``POST /api/catalog/register``), executes it
(``POST /api/execute``) and waits for ``playbook.completed|failed`` in ``noetl.event``. By
default one ``noetl-pgworker start --server-url …`` subprocess runs for the session.

Opt-in switches:

- ``NOETL_E2E_EXTERNAL_WORKER=1``: start no worker; the tests run against whatever worker is
  serving the server (e.g. NoETL's own), so the same tests give the differential result.
- ``NOETL_E2E_SIDE_BY_SIDE=1``: run ``test_side_by_side.py`` (needs NoETL's own worker running
  as well as ours; counts commands run twice).
- ``NOETL_E2E_REPORT=<file>``: append one JSON line per scenario (final status and the result
  of the last data step) to compare two runs.
- ``NOETL_E2E_SUITE=<checkout of noetl/e2e>``: also run NoETL's own regression suite
  (``test_suite.py``, ``suite.py``); our worker then runs with the checkout as its working
  directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import conninfo
from psycopg.rows import dict_row

HERE = Path(__file__).resolve().parent
PLAYBOOKS = HERE / "playbooks"
SERVER_URL = os.environ.get("NOETL_E2E_SERVER_URL", "").rstrip("/")
DSN = os.environ.get("NOETL_E2E_DSN", "")
EXTERNAL_WORKER = os.environ.get("NOETL_E2E_EXTERNAL_WORKER", "") not in ("", "0")
SIDE_BY_SIDE = os.environ.get("NOETL_E2E_SIDE_BY_SIDE", "") not in ("", "0")
REPORT = os.environ.get("NOETL_E2E_REPORT", "")
#: a checkout of NoETL's regression suite (noetl/e2e): test_suite.py runs it
SUITE = os.environ.get("NOETL_E2E_SUITE", "")
#: playbook paths in the catalog: <prefix>/<file stem>
PATH_PREFIX = "e2e/pgworker"
TERMINAL_EVENTS = ("playbook.completed", "playbook.failed")
#: seconds a test waits for a playbook to end
DEFAULT_WAIT = 90.0


def _named_on_command_line(config: pytest.Config) -> bool:
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path == HERE / "conftest.py":
        return None
    if not (SERVER_URL and DSN) or not _named_on_command_line(config):
        return True
    if collection_path.name == "test_side_by_side.py" and not SIDE_BY_SIDE:
        return True
    if collection_path.name == "test_suite.py" and not SUITE:
        return True
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


# --------------------------------------------------------------------------------------------
# The server and its database
# --------------------------------------------------------------------------------------------


@dataclass
class Execution:
    """One execution as the server and its database saw it once it ended (or timed out)."""

    id: str
    path: str
    terminal: str | None
    events: list[dict[str, Any]]
    commands: list[dict[str, Any]]
    status: dict[str, Any]
    seconds: float

    def steps_run(self) -> list[str]:
        """Step names with a command, in issue order (a loop step once per iteration)."""
        return [c["step_name"] for c in self.commands]

    def count(self, step: str) -> int:
        return sum(1 for c in self.commands if c["step_name"] == step)

    def done(self, step: str) -> list[dict[str, Any]]:
        """``event.result.context`` of the step's ``call.done`` events, in event order."""
        return [
            {
                k: v
                for k, v in ((e.get("result") or {}).get("context") or {}).items()
                if k not in ("command_id", "loop_event_id")
            }
            for e in self.events
            if e["event_type"] == "call.done" and e["node_name"] == step
        ]

    def errors(self) -> list[str]:
        return [
            f"{e['node_name']}: {e['event_type']}: {e['error']}"
            for e in self.events
            if e["error"] and e["event_type"] in ("call.error", "command.failed", "batch.failed")
        ]

    def variable(self, step: str) -> Any:
        return (self.status.get("variables") or {}).get(step)

    def describe(self) -> str:
        lines = [f"execution {self.id} ({self.path}): {self.terminal} after {self.seconds:.1f}s"]
        for e in self.events:
            err = f"  error={e['error'][:300]!r}" if e["error"] else ""
            res = json.dumps(e.get("result"), default=str)[:200]
            lines.append(f"  {e['event_type']:<20} {e['node_name']:<24} {e['status']}{err} {res}")
        return "\n".join(lines)


class NoetlServer:
    def __init__(self, url: str, dsn: str) -> None:
        self.url = url
        self.dsn = dsn
        self.http = httpx.Client(base_url=url, timeout=60)
        self._registered: dict[str, str] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def db(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row)

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with self.db() as conn:
            return conn.execute(sql, params).fetchall()

    def register(self, name: str) -> str:
        """Register ``playbooks/<name>.yaml`` (once per session); return its catalog path."""
        with self._lock:
            if name in self._registered:
                return self._registered[name]
            text = (PLAYBOOKS / f"{name}.yaml").read_text()
            path = f"{PATH_PREFIX}/{name}"
            assert f"path: {path}\n" in text, f"{name}.yaml must have metadata.path {path}"
            r = self.http.post(
                "/api/catalog/register", json={"content": text, "resource_type": "Playbook"}
            )
            assert r.status_code < 300, f"register {name}: {r.status_code} {r.text[:500]}"
            self._registered[name] = path
            return path

    def start(self, name: str, workload: dict[str, Any] | None = None) -> str:
        path = self.register(name)
        r = self.http.post("/api/execute", json={"path": path, "workload": workload or {}})
        assert r.status_code < 300, f"execute {path}: {r.status_code} {r.text[:500]}"
        return str(r.json()["execution_id"])

    def terminal_event(self, execution_id: str) -> str | None:
        rows = self.query(
            "SELECT event_type FROM noetl.event WHERE execution_id = %s"
            " AND event_type = ANY(%s) ORDER BY event_id LIMIT 1",
            (int(execution_id), list(TERMINAL_EVENTS)),
        )
        return rows[0]["event_type"] if rows else None

    def wait(self, execution_id: str, timeout: float = DEFAULT_WAIT, path: str = "") -> Execution:
        t0 = time.monotonic()
        terminal = None
        while time.monotonic() - t0 < timeout:
            terminal = self.terminal_event(execution_id)
            if terminal:
                break
            time.sleep(0.25)
        # the engine may still write workflow/playbook rows right after; give it a moment
        time.sleep(0.3)
        return self.snapshot(execution_id, terminal, time.monotonic() - t0, path)

    def snapshot(
        self, execution_id: str, terminal: str | None, seconds: float = 0.0, path: str = ""
    ) -> Execution:
        eid = int(execution_id)
        events = self.query(
            "SELECT event_id, event_type, node_name, status, result, error, worker_id, meta"
            " FROM noetl.event WHERE execution_id = %s ORDER BY event_id",
            (eid,),
        )
        commands = self.query(
            "SELECT command_id, step_name, tool_kind, status, worker_id, attempt, iter_index,"
            " error FROM noetl.command WHERE execution_id = %s ORDER BY created_at, command_id",
            (eid,),
        )
        r = self.http.get(f"/api/executions/{execution_id}/status")
        status = r.json() if r.status_code == 200 else {"http_status": r.status_code}
        return Execution(execution_id, path, terminal, events, commands, status, seconds)

    def run(
        self, name: str, workload: dict[str, Any] | None = None, timeout: float = DEFAULT_WAIT
    ) -> Execution:
        eid = self.start(name, workload)
        return self.wait(eid, timeout, path=f"{PATH_PREFIX}/{name}")

    def cancel(self, execution_id: str) -> dict[str, Any]:
        r = self.http.post(f"/api/executions/{execution_id}/cancel", json={"reason": "e2e"})
        assert r.status_code < 300, f"cancel: {r.status_code} {r.text[:500]}"
        return dict(r.json())

    def register_credential(self, name: str, kind: str, data: dict[str, Any]) -> None:
        r = self.http.post("/api/credentials", json={"name": name, "type": kind, "data": data})
        assert r.status_code < 300, f"credential {name}: {r.status_code} {r.text[:500]}"


@pytest.fixture(scope="session")
def noetl() -> Iterator[NoetlServer]:
    if not (SERVER_URL and DSN):
        pytest.fail("set NOETL_E2E_SERVER_URL and NOETL_E2E_DSN")
    server = NoetlServer(SERVER_URL, DSN)
    try:
        r = server.http.get("/api/health", timeout=10)
    except httpx.HTTPError as exc:
        pytest.fail(f"NoETL server {SERVER_URL} is not reachable: {exc}")
    assert r.status_code == 200, f"{SERVER_URL}/api/health: {r.status_code} {r.text[:200]}"
    with server.db() as conn:
        conn.execute("SELECT 1 FROM noetl.command LIMIT 1")
    yield server
    server.close()


# --------------------------------------------------------------------------------------------
# Our worker
# --------------------------------------------------------------------------------------------


def worker_command() -> list[str]:
    script = Path(sys.executable).with_name("noetl-pgworker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "noetl_pgworker"]


class WorkerProcess:
    """``noetl-pgworker start --server-url …`` as a subprocess, its stderr in a file."""

    def __init__(
        self,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.worker_id = f"e2e-{uuid.uuid4().hex[:12]}"
        self.log = log
        args = [
            *worker_command(),
            "start",
            "--dsn",
            DSN,
            "--server-url",
            SERVER_URL,
            "--worker-id",
            self.worker_id,
            "--concurrency",
            "4",
            "--poll-interval",
            "0.5",
            # The playbooks' HTTP server listens on loopback.
            "--http-allow-loopback",
            *extra,
        ]
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )

    def wait_ready(self, server: NoetlServer, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            rows = server.query(
                "SELECT status FROM noetl.runtime WHERE name = %s", (self.worker_id,)
            )
            if rows and rows[0]["status"] == "ready":
                return
            time.sleep(0.2)
        raise AssertionError(f"worker not ready within {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self._out.flush()
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def worker_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-workers")


#: aliases our worker gets from its own environment (a credential NoETL's server never sees)
LOCAL_PG_ALIAS = "e2e_pg_local"


@pytest.fixture(scope="session")
def worker(noetl: NoetlServer, worker_log_dir: Path) -> Iterator[WorkerProcess | None]:
    """Our worker for the session (None with NOETL_E2E_EXTERNAL_WORKER=1)."""
    if EXTERNAL_WORKER:
        yield None
        return
    env = {f"NOETL_PGWORKER_CREDENTIAL_{LOCAL_PG_ALIAS.upper()}": DSN}
    # NoETL's suite loads scripts by paths relative to the worker's working directory
    # The suite: file scripts from its checkout; 8 threads, because a sub-playbook step that
    # waits for its child (return_step) holds a thread while it waits, and the suite runs a
    # loop of four such steps beside other playbooks.
    extra = ("--script-dir", SUITE, "--concurrency", "8") if SUITE else ()
    proc = WorkerProcess(worker_log_dir / "worker.log", *extra, env=env, cwd=SUITE or None)
    try:
        proc.wait_ready(noetl)
        yield proc
    finally:
        code = proc.stop()
        sys.stderr.write(f"\n[e2e] worker {proc.worker_id} exit {code}, log {proc.log}\n")


@pytest.fixture
def run(
    noetl: NoetlServer, worker: WorkerProcess | None, request: pytest.FixtureRequest
) -> Callable[..., Execution]:
    """Run a playbook to its end; on a failed assertion the events are in the report."""

    def _run(
        name: str, workload: dict[str, Any] | None = None, timeout: float = DEFAULT_WAIT
    ) -> Execution:
        ex = noetl.run(name, workload, timeout)
        request.node.user_properties.append(("execution", ex.describe()))
        if worker is not None and worker.proc.poll() is not None:
            pytest.fail(f"our worker died (exit {worker.proc.returncode}):\n{worker.tail()}")
        return ex

    return _run


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    rep = yield
    if rep.when == "call" and rep.failed:
        for key, value in item.user_properties:
            if key == "execution":
                rep.sections.append(("noetl events", str(value)))
        proc = getattr(item, "funcargs", {}).get("worker")
        if isinstance(proc, WorkerProcess):
            rep.sections.append((f"worker {proc.worker_id} log (tail)", proc.tail(30)))
    return rep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The suite's table (test_suite.py), whatever the verdicts."""
    from . import suite

    if suite.SUMMARY:
        terminalreporter.write_sep("-", "NoETL's regression suite")
        for line in suite.SUMMARY:
            terminalreporter.write_line(line)


def report(scenario: str, ex: Execution, last_step: str) -> None:
    """With NOETL_E2E_REPORT, record final status and the last data step's result."""
    if not REPORT:
        return
    results = ex.done(last_step)
    line = {
        "scenario": scenario,
        "terminal": ex.terminal,
        "last_step": last_step,
        "result": results[-1] if results else None,
        "variable": ex.variable(last_step),
        "errors": ex.errors()[:3],
        "steps": sorted(set(ex.steps_run())),
    }
    with open(REPORT, "a") as f:
        f.write(json.dumps(line, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# A local HTTP server for the http playbook
# --------------------------------------------------------------------------------------------


@dataclass
class LocalHttp:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _reply(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.record.requests.append({"method": "GET", "path": self.path})
        if self.path.startswith("/flaky/"):
            # /flaky/<key>/<n>: 503 for the first n calls with this key, then 200
            _, _, key, fails = self.path.split("?")[0].split("/")[:4]
            seen = self.server.record.requests
            calls = sum(1 for r in seen if r["path"].startswith(f"/flaky/{key}/"))
            if calls <= int(fails):
                self._reply(503, {"error": "try again", "call": calls})
            else:
                self._reply(200, {"value": f"ok-after-{calls}", "call": calls})
        elif self.path.startswith("/item/"):
            item = self.path.split("/")[2].split("?")[0]
            self._reply(200, {"id": int(item), "value": f"value-{item}"})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode(errors="replace")
        self.server.record.requests.append({"method": "POST", "path": self.path, "body": body})
        self._reply(200, {"echo": body})


@pytest.fixture
def local_http() -> Iterator[LocalHttp]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    record = LocalHttp(f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.record = record  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def dsn_parts(dsn: str) -> dict[str, Any]:
    """host/port/user/password/database of a DSN (NoETL's postgres credential fields)."""
    info = conninfo.conninfo_to_dict(dsn)
    return {
        "host": info.get("host") or "localhost",
        "port": int(info.get("port") or 5432),
        "user": info.get("user") or "postgres",
        "password": info.get("password") or "",
        "database": info.get("dbname") or "postgres",
    }


#: a role the postgres playbooks log in as, with a password (NoETL's credential needs one)
PG_ROLE = "noetl_e2e_pg"
PG_ROLE_PASSWORD = "e2e-pg-Secret-1"


def pg_credential(server: NoetlServer) -> dict[str, Any]:
    """NoETL postgres credential fields for a login role with a password (created if needed)."""
    parts = dsn_parts(server.dsn)
    try:
        with server.db() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_ROLE,))
            verb = "ALTER" if exists.fetchone() else "CREATE"
            conn.execute(f"{verb} ROLE {PG_ROLE} LOGIN PASSWORD '{PG_ROLE_PASSWORD}'")
    except psycopg.Error as exc:
        if not parts["password"]:
            # A postgres step with a credential is one of the scenarios this tier must show:
            # a database where it cannot be set up is a failure to report, not a skip.
            pytest.fail(
                "the postgres credential scenarios need a login role with a password: give"
                f" NOETL_E2E_DSN a role that may CREATE ROLE, or a password in it ({exc})"
            )
        return parts
    return {**parts, "user": PG_ROLE, "password": PG_ROLE_PASSWORD}


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    t0 = time.monotonic()
    yield lambda: time.monotonic() - t0
