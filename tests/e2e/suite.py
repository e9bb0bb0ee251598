"""NoETL's own regression suite (a checkout of ``noetl/e2e``), run by this tier.

``NOETL_E2E_SUITE=<checkout>`` names the suite; nothing of it lives in this repository. Every
playbook of ``fixtures/playbook_test_config.yaml`` that needs no cloud service is registered
with the server, executed and judged by its own ``validation`` block, the way NoETL's own
regression runner judges it (execution status; ``min_steps``, ``required_steps`` counted from
the completion events ``action_completed``, ``step.exit`` COMPLETED and ``command.completed``;
``error_pattern`` matched against the failure events' errors), plus ``step_validations``
(the step's result as the server keeps it).

Stand-ins, started here for the session:

- the suite's pagination server (``fixtures/servers/paginated_api.py``, port 5555), run with
  ``NOETL_E2E_SUITE_PYTHON`` (a Python that has fastapi and uvicorn);
- a local HTTP server answering for the public hosts the playbooks call (open-meteo, httpbin,
  jsonplaceholder, raw GitHub files served from the checkout); the playbooks' URLs are
  rewritten to it (and the pagination server's cluster host to 127.0.0.1:5555) before they
  are registered;
- the credentials ``pg_k8s`` and ``pg_local`` (``POST /api/credentials``), a login role on the
  database of ``NOETL_E2E_DSN``.

The worker must run with the checkout as its working directory (playbooks load scripts by
relative path): this tier starts ours there, with ``--script-dir`` the checkout; start NoETL's
own there too.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from psycopg import sql

SUITE = os.environ.get("NOETL_E2E_SUITE", "")
SUITE_PYTHON = os.environ.get("NOETL_E2E_SUITE_PYTHON", "")
#: seconds one playbook may take (the config's own timeout when lower)
SUITE_TIMEOUT = float(os.environ.get("NOETL_E2E_SUITE_TIMEOUT", "180"))
#: comma-separated playbook names: run only these
SUITE_ONLY = [n for n in os.environ.get("NOETL_E2E_SUITE_ONLY", "").split(",") if n.strip()]
#: playbooks run at once (those with a postgres step one at a time: they share tables)
SUITE_PARALLEL = int(os.environ.get("NOETL_E2E_SUITE_PARALLEL", "4"))
SUITE_REPORT = os.environ.get("NOETL_E2E_SUITE_REPORT", "")
CONFIG = "fixtures/playbook_test_config.yaml"
PAGINATION_PORT = 5555
PAGINATION_HOST = "paginated-api.test-server.svc.cluster.local:5555"
#: hosts the local HTTP stand-in answers for
PUBLIC_HOSTS = (
    "api.open-meteo.com",
    "httpbin.org",
    "jsonplaceholder.typicode.com",
    "raw.githubusercontent.com",
)
#: the credentials this tier registers (the config's others are cloud accounts)
LOCAL_CREDENTIALS = ("pg_k8s", "pg_local")
#: what marks a playbook as needing a cloud service, besides a cloud credential's name
CLOUD_MARKERS = (
    re.compile(r"kind:\s*(snowflake|gcs|snowflake_transfer)\b"),
    re.compile(r"provider:\s*secret_manager\b"),
    re.compile(r"gs://"),
)
COMPLETION_EVENTS = ("action_completed", "step.exit", "command.completed")
FAILURE_EVENTS = (
    "action_failed",
    "step.failed",
    "command.failed",
    "playbook.failed",
    "workflow.failed",
)
TERMINAL_EVENTS = ("playbook.completed", "playbook.failed")


# --------------------------------------------------------------------------------------------
# The suite's playbooks
# --------------------------------------------------------------------------------------------


@dataclass
class SuitePlaybook:
    name: str
    file: Path
    catalog_path: str
    config: dict[str, Any]
    text: str
    cloud: str = ""  # why it needs a cloud service ("" = it does not)

    @property
    def validation(self) -> dict[str, Any]:
        return dict(self.config.get("validation") or {})

    def workload(self) -> dict[str, Any]:
        """What NoETL's regression runner passes (``pg_auth`` when it needs ``pg_k8s``)."""
        creds = self.config.get("requires_credentials") or []
        return {"pg_auth": "pg_k8s"} if "pg_k8s" in creds else {}

    def uses_postgres(self) -> bool:
        return bool(re.search(r"kind:\s*postgres\b", self.text))


def _playbook_file(root: Path, path: str) -> Path | None:
    for ext in (".yaml", ".yml"):
        candidate = root / f"{path}{ext}"
        if candidate.is_file():
            return candidate
    return None


def catalog_index(root: Path) -> dict[str, Path]:
    """``metadata.path`` → file, for every playbook of the checkout."""
    index: dict[str, Path] = {}
    for file in sorted((root / "fixtures" / "playbooks").rglob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(file.read_text()))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "Playbook":
                path = (doc.get("metadata") or {}).get("path")
                if isinstance(path, str):
                    index.setdefault(path, file)
    return index


def load_suite(root: Path) -> tuple[list[SuitePlaybook], dict[str, Any]]:
    """The config's enabled playbooks (cloud ones marked) and its setup tasks."""
    config = yaml.safe_load((root / CONFIG).read_text())
    cloud_creds = {
        c
        for c in (config.get("config") or {}).get("required_credentials") or []
        if c not in LOCAL_CREDENTIALS
    }
    playbooks = []
    for entry in config.get("playbooks") or []:
        if not entry.get("enabled", True):
            continue
        file = _playbook_file(root, entry["path"])
        if file is None:
            raise AssertionError(f"suite playbook {entry['name']}: no file {entry['path']}.yaml")
        text = file.read_text()
        doc = yaml.safe_load(text)
        pb = SuitePlaybook(entry["name"], file, doc["metadata"]["path"], entry, text)
        pb.cloud = _cloud_reason(pb, cloud_creds)
        playbooks.append(pb)
    return playbooks, dict(config.get("setup_tasks") or {})


def _cloud_reason(pb: SuitePlaybook, cloud_creds: set[str]) -> str:
    needed = set(pb.config.get("requires_credentials") or []) & cloud_creds
    named = {c for c in cloud_creds if re.search(rf"\b{re.escape(c)}\b", pb.text)}
    if needed | named:
        return "cloud credential " + ", ".join(sorted(needed | named))
    for marker in CLOUD_MARKERS:
        found = marker.search(pb.text)
        if found:
            return f"cloud service ({found.group(0)})"
    return ""


def rewrite_hosts(text: str, public_base: str) -> str:
    """Point the playbook's public hosts at the local stand-in, the cluster host at 5555."""
    text = text.replace(f"http://{PAGINATION_HOST}", f"http://127.0.0.1:{PAGINATION_PORT}")
    text = text.replace(PAGINATION_HOST, f"127.0.0.1:{PAGINATION_PORT}")
    for host in PUBLIC_HOSTS:
        text = re.sub(rf"https?://{re.escape(host)}", f"{public_base}/{host}", text)
    return text


def referenced(text: str, index: dict[str, Path]) -> list[str]:
    """Catalog paths of other playbooks that ``text`` names (sub-playbooks)."""
    found = re.findall(r"path:\s*['\"]?([\w./-]+)", text)
    return [p for p in dict.fromkeys(found) if p in index]


# --------------------------------------------------------------------------------------------
# Judging an execution by the playbook's validation block
# --------------------------------------------------------------------------------------------


def step_name(event: dict[str, Any]) -> str:
    name = str(event.get("node_name") or "")
    return name.removesuffix(":task_sequence")


def is_completion(event: dict[str, Any]) -> bool:
    if event.get("event_type") not in COMPLETION_EVENTS:
        return False
    status = str(event.get("status") or "").upper()
    return not (event.get("event_type") == "step.exit" and status and status != "COMPLETED")


def completed_steps(events: list[dict[str, Any]]) -> set[str]:
    return {step_name(e) for e in events if is_completion(e) and step_name(e)}


def failure_texts(events: list[dict[str, Any]]) -> list[str]:
    texts = []
    for e in events:
        if e.get("event_type") in FAILURE_EVENTS or str(e.get("status") or "").upper() == "FAILED":
            error = e.get("error")
            if not error and isinstance(e.get("result"), dict):
                error = json.dumps(e["result"], default=str)
            texts.append(str(error or ""))
    return texts


def dotted(value: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def judge(
    pb: SuitePlaybook,
    terminal: str | None,
    events: list[dict[str, Any]],
    results: dict[str, Any],
) -> list[str]:
    """Why the execution fails the playbook's validation (empty: it passes)."""
    v = pb.validation
    problems: list[str] = []
    status = {"playbook.completed": "completed", "playbook.failed": "failed"}.get(
        terminal or "", "no playbook.completed/failed event (timeout)"
    )
    expected = str(v.get("execution_status", "completed"))
    if status != expected:
        problems.append(f"status {status}, expected {expected}")
    if "min_steps" in v:
        count = sum(1 for e in events if is_completion(e))
        if count < int(v["min_steps"]):
            problems.append(f"{count} step completion events, expected at least {v['min_steps']}")
    if "required_steps" in v:
        missing = set(v["required_steps"]) - completed_steps(events)
        if missing:
            problems.append(f"steps never completed: {sorted(missing)}")
    if v.get("expect_error") and "error_pattern" in v:
        pattern = re.compile(str(v["error_pattern"]), re.IGNORECASE)
        if not any(pattern.search(t) for t in failure_texts(events)):
            problems.append(f"no failure event's error matches {v['error_pattern']!r}")
    for step, checks in (v.get("step_validations") or {}).items():
        problems.extend(_step_problems(step, checks, events, results))
    return problems


def _step_problems(
    step: str, checks: dict[str, Any], events: list[dict[str, Any]], results: dict[str, Any]
) -> list[str]:
    problems = []
    if checks.get("status") == "action_completed" and step not in completed_steps(events):
        problems.append(f"{step}: never completed")
    if step not in results:
        return [*problems, f"{step}: no result kept by the server"]
    result = results[step]
    if checks.get("result_type") == "dict" and not isinstance(result, dict):
        problems.append(f"{step}: result is {type(result).__name__}, expected dict")
    for name in checks.get("result_fields") or []:
        if not isinstance(result, dict) or name not in result:
            problems.append(f"{step}: result has no field {name!r}")
    for check in checks.get("result_checks") or []:
        try:
            actual = dotted(result, str(check["field"]))
        except KeyError:
            problems.append(f"{step}: result has no {check['field']!r}")
            continue
        if actual != check.get("value"):
            problems.append(f"{step}: {check['field']} = {actual!r}, expected {check['value']!r}")
    return problems


# --------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PaginationServer:
    """The suite's ``fixtures/servers/paginated_api.py`` on port 5555, for the session."""

    def __init__(self, root: Path, python: str, log: Path) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = log
        if _port_open(PAGINATION_PORT):
            raise AssertionError(
                f"port {PAGINATION_PORT} is taken: stop what listens there (the suite's"
                " pagination server is started by this tier)"
            )
        if not python:
            raise AssertionError(
                "set NOETL_E2E_SUITE_PYTHON to a Python with fastapi and uvicorn (it runs the"
                " suite's fixtures/servers/paginated_api.py)"
            )
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [python, str(root / "fixtures/servers/paginated_api.py"), str(PAGINATION_PORT)],
            cwd=root,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not _port_open(PAGINATION_PORT):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"pagination server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


def _posts() -> list[dict[str, Any]]:
    return [
        {"userId": 1 + (i - 1) // 10, "id": i, "title": f"post {i}", "body": f"body of post {i}"}
        for i in range(1, 101)
    ]


class _PublicHandler(BaseHTTPRequestHandler):
    """``/<host>/<path>``: what the public hosts answer, enough for the suite's playbooks."""

    server: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _reply(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")

    def _route(self, method: str) -> None:
        body = self._body() if method in ("POST", "PUT", "PATCH") else None
        url = urlsplit(self.path)
        host, _, rest = url.path.lstrip("/").partition("/")
        rest = "/" + rest
        args = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.requests.append((method, host, rest))
        headers = {k: v for k, v in self.headers.items()}
        if host == "api.open-meteo.com" and rest.startswith("/v1/forecast"):
            temps = [12.0 + (h % 24) * 0.5 for h in range(24)]
            times = [f"2026-01-01T{h:02d}:00" for h in range(24)]
            self._reply(
                200,
                {
                    "latitude": float(args.get("latitude", 0)),
                    "longitude": float(args.get("longitude", 0)),
                    "hourly": {"time": times, "temperature_2m": temps},
                    "current_weather": {"temperature": 18.5, "windspeed": 3.2},
                },
            )
        elif host == "httpbin.org" and rest.startswith("/status/"):
            self._reply(int(rest.split("/")[2]), {})
        elif host == "httpbin.org":
            self._reply(
                200,
                {
                    "args": args,
                    "headers": headers,
                    "url": f"https://{host}{rest}",
                    "json": body if not isinstance(body, str) else None,
                    "data": json.dumps(body) if body is not None else "",
                    "method": method,
                },
            )
        elif host == "jsonplaceholder.typicode.com" and rest.rstrip("/") == "/posts":
            self._reply(200, _posts())
        elif host == "jsonplaceholder.typicode.com" and rest.startswith("/posts/"):
            n = int(rest.split("/")[2])
            self._reply(200, _posts()[n - 1] if 1 <= n <= 100 else {})
        elif host == "raw.githubusercontent.com":
            self._raw_file(rest)
        else:
            self._reply(404, {"error": f"no stand-in for {host}{rest}"})

    def _raw_file(self, rest: str) -> None:
        # /<owner>/<repo>/<ref>/<path>: the same path in the suite's checkout
        parts = rest.lstrip("/").split("/", 3)
        file = Path(self.server.root) / parts[3] if len(parts) == 4 else None
        if file is not None and file.is_file():
            self._reply(200, file.read_bytes(), "text/plain; charset=utf-8")
        else:
            self._reply(404, b"404: Not Found", "text/plain")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class PublicHosts:
    """A local HTTP server standing in for the public hosts, for the session."""

    def __init__(self, root: Path) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PublicHandler)
        self.httpd.daemon_threads = True
        self.httpd.root = str(root)  # type: ignore[attr-defined]
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="suite-public-hosts", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


# --------------------------------------------------------------------------------------------
# Running the suite
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    execution_id: str = ""
    terminal: str | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def passed(self) -> bool:
        return not self.skipped and not self.problems

    def line(self) -> dict[str, Any]:
        return {
            "playbook": self.name,
            "result": "skip" if self.skipped else ("pass" if self.passed else "fail"),
            "skipped": self.skipped,
            "execution_id": self.execution_id,
            "terminal": self.terminal,
            "seconds": round(self.seconds, 1),
            "problems": self.problems,
            "errors": self.errors[:3],
        }


class SuiteRun:
    """Registers, runs and judges the suite's playbooks on one server."""

    def __init__(self, server: Any, root: Path, public_base: str) -> None:
        self.server = server
        self.root = root
        self.public_base = public_base
        self.index = catalog_index(root)
        self.playbooks, self.setup_tasks = load_suite(root)
        self._registered: set[str] = set()
        self._lock = threading.Lock()
        self._db_lane = threading.Lock()
        self._setup_done: dict[str, Outcome] = {}

    def selected(self) -> list[SuitePlaybook]:
        if not SUITE_ONLY:
            return self.playbooks
        return [pb for pb in self.playbooks if pb.name in SUITE_ONLY]

    def register_credentials(self, fields: dict[str, Any]) -> None:
        """``pg_k8s`` and ``pg_local``: the login role of ``fields``, which may create tables in
        ``public`` (the suite's playbooks do; PostgreSQL 15 no longer lets every role)."""
        with self.server.db() as conn:
            conn.execute(
                sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(
                    sql.Identifier(fields["user"])
                )
            )
        for name in LOCAL_CREDENTIALS:
            self.server.register_credential(name, "postgres", fields)

    def register(self, catalog_path: str) -> None:
        with self._lock:
            if catalog_path in self._registered:
                return
            self._registered.add(catalog_path)
        text = self.index[catalog_path].read_text()
        for sub in referenced(text, self.index):
            if sub != catalog_path:
                self.register(sub)
        content = rewrite_hosts(text, self.public_base)
        r = self.server.http.post(
            "/api/catalog/register", json={"content": content, "resource_type": "Playbook"}
        )
        assert r.status_code < 300, f"register {catalog_path}: {r.status_code} {r.text[:300]}"

    def execute(self, catalog_path: str, workload: dict[str, Any], timeout: float) -> Outcome:
        self.register(catalog_path)
        t0 = time.monotonic()
        r = self.server.http.post("/api/execute", json={"path": catalog_path, "workload": workload})
        if r.status_code >= 300:
            return Outcome(catalog_path, problems=[f"execute: {r.status_code} {r.text[:300]}"])
        eid = str(r.json()["execution_id"])
        terminal = None
        while time.monotonic() - t0 < timeout:
            terminal = self.server.terminal_event(eid)
            if terminal:
                break
            time.sleep(1.0)
        if terminal is None:
            self.server.cancel(eid)
        time.sleep(1.0)  # the server may still write the last rows
        return Outcome(catalog_path, eid, terminal, time.monotonic() - t0)

    def run_setup(self, pb: SuitePlaybook) -> Outcome | None:
        task = pb.config.get("requires_setup")
        if not task:
            return None
        if task not in self._setup_done:
            spec = self.setup_tasks.get(task) or {}
            file = _playbook_file(self.root, str(spec.get("playbook", "")))
            assert file is not None, f"setup task {task}: no playbook {spec.get('playbook')}"
            catalog_path = yaml.safe_load(file.read_text())["metadata"]["path"]
            workload = {"pg_auth": "pg_k8s"} if "pg_k8s" in (spec.get("credentials") or []) else {}
            self._setup_done[task] = self.execute(catalog_path, workload, SUITE_TIMEOUT)
        return self._setup_done[task]

    def run_one(self, pb: SuitePlaybook) -> Outcome:
        if pb.cloud:
            return Outcome(pb.name, skipped=f"needs a cloud service: {pb.cloud}")
        if pb.uses_postgres():
            with self._db_lane:
                return self._run(pb)
        return self._run(pb)

    def _run(self, pb: SuitePlaybook) -> Outcome:
        setup = self.run_setup(pb)
        if setup is not None and setup.terminal != "playbook.completed":
            return Outcome(
                pb.name, problems=[f"setup {pb.config['requires_setup']}: {setup.terminal}"]
            )
        timeout = min(SUITE_TIMEOUT, float(pb.config.get("timeout") or SUITE_TIMEOUT))
        out = self.execute(pb.catalog_path, pb.workload(), timeout)
        out.name = pb.name
        if out.problems:
            return out
        ex = self.server.snapshot(out.execution_id, out.terminal, out.seconds, pb.catalog_path)
        out.problems = judge(pb, out.terminal, ex.events, self.results(ex))
        out.errors = ex.errors()
        return out

    def results(self, ex: Any) -> dict[str, Any]:
        """Each step's result as the server keeps it (``noetl.execution.state.step_results``
        on NoETL 4.26, whose events carry no step data; else the ``call.done`` events)."""
        rows = self.server.query(
            "SELECT state -> 'step_results' AS r FROM noetl.execution WHERE execution_id = %s",
            (int(ex.id),),
        )
        kept = rows[0]["r"] if rows and isinstance(rows[0]["r"], dict) else {}
        results = {
            step_name({"node_name": k}): (v.get("context", v) if isinstance(v, dict) else v)
            for k, v in kept.items()
        }
        for e in ex.events:
            if e["event_type"] == "call.done" and step_name(e) not in results:
                ctx = (e.get("result") or {}).get("context")
                if ctx is not None:
                    results[step_name(e)] = ctx
        return results

    def run_all(self) -> dict[str, Outcome]:
        selected = self.selected()
        with ThreadPoolExecutor(SUITE_PARALLEL, thread_name_prefix="suite") as pool:
            outcomes = list(pool.map(self.run_one, selected))
        by_name = {o.name: o for o in outcomes}
        if SUITE_REPORT:
            with open(SUITE_REPORT, "a") as f:
                for o in outcomes:
                    f.write(json.dumps(o.line(), sort_keys=True) + "\n")
        return by_name


#: the last run's summary, for the terminal report (conftest's pytest_terminal_summary)
SUMMARY: list[str] = []


def summary(outcomes: dict[str, Outcome]) -> Iterator[str]:
    ran = [o for o in outcomes.values() if not o.skipped]
    passed = [o for o in ran if o.passed]
    cloud = len(outcomes) - len(ran)
    yield f"suite: {len(passed)} of {len(ran)} pass ({cloud} need a cloud service)"
    for o in outcomes.values():
        state = "skip" if o.skipped else ("pass" if o.passed else "FAIL")
        why = o.skipped or "; ".join(o.problems)
        yield f"  {state:<4} {o.name:<32} {o.execution_id:<20} {o.seconds:6.1f}s {why}"
