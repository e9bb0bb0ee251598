"""The ``playbook`` tool against a small HTTP server that answers as NoETL's does (4.26:
``POST /api/execute`` → ``{"execution_id", "status", …}``; ``GET
/api/executions/{id}/status`` → ``{"completed", "failed", …}``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.models import Command
from noetl_pgworker.tools import ToolRegistry
from noetl_pgworker.tools.playbook import PlaybookTool

pytestmark = pytest.mark.unit


class Server:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.polls = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.posts.append(body)
                if body["path"] == "missing":
                    self._reply(404, {"detail": "Playbook not found: missing"})
                else:
                    self._reply(200, {"execution_id": "77", "status": "started"})

            def do_GET(self) -> None:
                server.polls += 1
                done = server.polls >= 2
                self._reply(200, {"execution_id": "77", "completed": done, "failed": False})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def command(config: dict[str, Any]) -> Command:
    return Command(
        command_id="5",
        execution_id=42,
        step="child",
        tool_kind="playbook",
        catalog_id=1,
        input={
            "tool_config": config,
            "input": {"base": 20},
            "render_context": {"workload": {"x": 1}},
        },
    )


def run(tool: PlaybookTool, config: dict[str, Any]) -> Any:
    registry = ToolRegistry([tool])
    try:
        return execute(command(config), registry, timeout=30)
    finally:
        registry.close()


def test_a_sub_playbook_is_started_with_the_parent_and_the_context(server: Server) -> None:
    out = run(PlaybookTool(server.url), {"path": "e2e/child", "input": {"base": 21}})
    assert out.ok, out.error
    assert server.posts == [
        {
            "path": "e2e/child",
            "payload": {"workload": {"x": 1}, "base": 21},
            "parent_execution_id": 42,
        }
    ]
    assert out.data["status"] == "success" and out.data["execution_id"] == "77"
    assert out.data["data"] == {"execution_id": "77", "status": "started"}


def test_return_step_waits_for_the_child(server: Server) -> None:
    tool = PlaybookTool(server.url, poll_interval=0.05)
    out = run(tool, {"path": "e2e/child", "return_step": "end"})
    assert out.ok, out.error
    assert out.data["completed"] is True and server.polls == 2
    assert server.posts[0]["payload"] == {"base": 20}


def test_a_refused_start_fails_clearly_and_direct_mode_says_what_is_missing(
    server: Server,
) -> None:
    out = run(PlaybookTool(server.url), {"path": "missing"})
    assert not out.ok and "HTTP 404" in (out.error or "") and "missing" in (out.error or "")
    direct = run(PlaybookTool(None), {"path": "e2e/child"})
    assert not direct.ok and "--server-url" in (direct.error or "")
