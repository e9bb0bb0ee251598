"""``artifact``: load a result NoETL keeps by reference, as NoETL's worker does (server mode).

Input: ``action`` (``get``, the default), and ``result_ref`` (a reference object ``{kind:
result_ref|temp_ref, ref}`` as ``{{ step._ref }}`` or ``{{ step.reference }}`` gives it, or
its ``ref`` string) or ``uri``: a ``noetl://…`` reference to the server's result store. The
output is the stored data itself (NoETL's worker returns the loaded ``data``).

Refused with a clear error: ``action: put`` and every other scheme (``file://``,
``artifact://``, ``s3://``, ``gs://``, NATS): a command must not read or write the worker's
own files, and this worker holds no cloud storage clients.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import ToolError
from ..models import Command
from .base import ToolContext

RESOLVE_PATHS = ("/api/result/resolve", "/api/api/result/resolve")  # 2.103.4: double prefix


class ArtifactTool:
    kind = "artifact"

    def __init__(self, server_url: str) -> None:
        self._server_url = server_url.rstrip("/")
        self._client: httpx.Client | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def run(self, command: Command, ctx: ToolContext) -> Any:
        cfg = {**command.args, **command.tool_config}
        action = cfg.get("action") or "get"
        if action != "get":
            raise ToolError(f"artifact: action {action!r} is not supported by this worker (get is)")
        uri = reference_uri(cfg)
        if urlsplit(uri).scheme != "noetl":
            raise ToolError(
                f"artifact: {uri!r} is not a noetl:// reference; this worker loads only results"
                " kept by NoETL's server (no files, no cloud storage)"
            )
        return self._resolve(uri, ctx.remaining())

    def _resolve(self, uri: str, timeout: float) -> Any:
        if self._client is None:
            self._client = httpx.Client(
                base_url=self._server_url, headers={"User-Agent": "noetl-pgworker"}
            )
        resp: httpx.Response | None = None
        try:
            for path in RESOLVE_PATHS:
                resp = self._client.get(path, params={"ref": uri}, timeout=timeout)
                if not (resp.status_code == 404 and resp.text.strip() == '{"detail":"Not Found"}'):
                    break
        except httpx.HTTPError as exc:
            raise ToolError(f"artifact: cannot reach the NoETL server for {uri}: {exc}") from None
        assert resp is not None
        if resp.status_code == 404:
            raise ToolError(f"artifact: result not found: {uri}")
        if not resp.is_success:
            raise ToolError(f"artifact: the NoETL server answered {resp.status_code} for {uri}")
        try:
            answer = resp.json()
        except ValueError:
            raise ToolError(f"artifact: the NoETL server's answer for {uri} is not JSON") from None
        return answer.get("data", answer) if isinstance(answer, dict) else answer


def reference_uri(cfg: dict[str, Any]) -> str:
    """The reference ``result_ref`` (an object or its ``ref``) or ``uri`` names."""
    ref = cfg.get("result_ref")
    if isinstance(ref, dict):
        if ref.get("kind") not in ("result_ref", "temp_ref") or not isinstance(ref.get("ref"), str):
            raise ToolError("artifact: result_ref must be {kind: result_ref|temp_ref, ref}")
        return str(ref["ref"])
    if isinstance(ref, str) and ref.strip():
        return ref.strip()
    uri = cfg.get("uri")
    if isinstance(uri, str) and uri.strip():
        return uri.strip()
    raise ToolError("artifact: give result_ref (a reference) or uri")


__all__ = ["ArtifactTool", "reference_uri"]
