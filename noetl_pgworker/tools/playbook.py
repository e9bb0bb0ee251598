"""``playbook``: start a sub-playbook through the NoETL server, as NoETL's worker does.

Input: ``path`` (the playbook's catalog path, required), ``version`` (default latest),
``input`` (the child's arguments; else the step's), ``return_step`` (wait for the child),
``timeout`` (seconds to wait with ``return_step``, default 300, within the command's time).

Without ``return_step`` the child is started and the step ends (NoETL's fire-and-forget):
``POST {server}/api/execute`` with ``{"path", "payload": <render context + arguments>,
"parent_execution_id"}``; the result is ``{"id", "status": "success", "data": <the server's
answer>, "execution_id", "duration"}``. With ``return_step`` the payload is the arguments alone
and the step waits, polling ``GET /api/executions/{id}/status`` every 2 s, until the child is
completed or failed; the result is that status (or, when the wait runs out, ``{"status":
"started", "execution_id", "path", "async": false}``). Only in server mode: without a NoETL
server the command fails saying so.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import httpx

from ..errors import ToolError
from ..models import Command
from .base import ToolContext

POLL_INTERVAL = 2.0


class PlaybookTool:
    kind = "playbook"

    def __init__(self, server_url: str | None = None, *, poll_interval: float = POLL_INTERVAL):
        self._server_url = server_url.rstrip("/") if server_url else None
        self._poll_interval = poll_interval
        self._client: httpx.Client | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _http(self) -> httpx.Client:
        if self._server_url is None:
            raise ToolError(
                "playbook: starting a sub-playbook needs a NoETL server; run the worker with"
                " --server-url"
            )
        if self._client is None:
            self._client = httpx.Client(
                base_url=self._server_url, headers={"User-Agent": "noetl-pgworker"}
            )
        return self._client

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        config = command.tool_config
        path = config.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ToolError("playbook: tool_config.path (the playbook's catalog path) is required")
        given = config.get("input")
        args: dict[str, Any] = given if isinstance(given, dict) else command.args
        client = self._http()
        started = time.monotonic()
        return_step = config.get("return_step")
        if return_step:
            body: dict[str, Any] = {"path": path, "payload": args}
        else:
            render = command.input.get("render_context")
            payload = {**(render if isinstance(render, dict) else {}), **args}
            body = {"path": path, "payload": payload}
            version = config.get("version")
            if version not in (None, "latest"):
                with contextlib.suppress(TypeError, ValueError):  # a name: the latest
                    body["version"] = int(version)
        body["parent_execution_id"] = command.execution_id
        answer = self._post(client, body, ctx)
        execution_id = answer.get("execution_id")
        if not return_step:
            return {
                "id": str(uuid.uuid4()),
                "status": "success",
                "data": answer,
                "execution_id": execution_id,
                "duration": time.monotonic() - started,
            }
        wait = config.get("timeout", 300)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait <= 0:
            wait = 300
        deadline = time.monotonic() + min(float(wait), ctx.remaining())
        while time.monotonic() + self._poll_interval < deadline:
            time.sleep(self._poll_interval)
            state = self._status(client, execution_id)
            if state is not None and (state.get("completed") or state.get("failed")):
                return state
        return {"status": "started", "execution_id": execution_id, "path": path, "async": False}

    @staticmethod
    def _post(client: httpx.Client, body: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        try:
            resp = client.post("/api/execute", json=body, timeout=min(30.0, ctx.remaining()))
        except httpx.HTTPError as exc:
            raise ToolError(f"playbook: the NoETL server is unreachable: {exc}") from None
        if resp.status_code != 200:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ToolError(
                f"playbook: the server refused to start {body['path']!r}:"
                f" HTTP {resp.status_code}: {str(detail)[:500]}"
            )
        answer = resp.json()
        if not isinstance(answer, dict):
            raise ToolError("playbook: the server's answer to /api/execute is not an object")
        return answer

    @staticmethod
    def _status(client: httpx.Client, execution_id: Any) -> dict[str, Any] | None:
        try:
            resp = client.get(f"/api/executions/{execution_id}/status", timeout=10.0)
        except httpx.HTTPError:
            return None  # a blip: ask again at the next poll
        if resp.status_code != 200:
            return None
        data = resp.json()
        return data if isinstance(data, dict) else None
