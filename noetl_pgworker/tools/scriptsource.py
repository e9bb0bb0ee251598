"""``script:``: a tool's code or SQL kept outside the playbook, NoETL's way.

``tool_config.script`` is ``{uri, source: {type, endpoint?, method?, headers?, timeout?},
encoding?}`` and, as in NoETL's worker, takes priority over inline code (``python``) or SQL
(``postgres``, ``duckdb``). Source types:

- ``file``: ``uri`` is a path under the worker's ``--script-dir`` (a relative one is resolved
  there, as NoETL's worker resolves it in its working directory); a path outside it, or any
  file script without ``--script-dir``, is refused: a row never reads the worker's own files.
- ``http``: ``source.endpoint`` (else ``uri``) is fetched with ``source.method`` (default GET),
  ``source.headers`` and ``source.timeout`` (seconds, default 30, never past the command's
  time); 404 → "Script not found", 401/403 → "Access denied", other >= 400 → failure.

``gcs`` and ``s3`` (NoETL's cloud sources) are refused with a clear error: this worker holds
no cloud storage clients. Templates in ``uri``, ``endpoint`` and header values are rendered
against the command's context, as NoETL renders them. A script is text of at most
:data:`MAX_SCRIPT_BYTES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from ..errors import ToolError
from ..models import Command
from ..render import command_context, render_text
from .base import Confinement
from .netcheck import refusal

SOURCE_TYPES = ("file", "http", "gcs", "s3")
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
DEFAULT_HTTP_TIMEOUT = 30.0
MAX_SCRIPT_BYTES = 16 * 1024 * 1024

Render = Callable[[str], str]


def has_script(config: Mapping[str, Any]) -> bool:
    return config.get("script") is not None


def load_script(
    config: Mapping[str, Any],
    tool: str,
    *,
    render: Render | None = None,
    timeout: float = DEFAULT_HTTP_TIMEOUT,
    confinement: Confinement | None = None,
) -> str:
    """The text ``config["script"]`` names; ToolError saying what is wrong otherwise. An http
    source (and every redirect) may go only where the http tool may (``confinement``)."""
    script = config.get("script")
    if not isinstance(script, dict):
        raise ToolError(f"{tool}: tool_config.script must be an object (uri, source)")
    source = script.get("source")
    if not isinstance(source, dict) or not source.get("type"):
        raise ToolError(f"{tool}: tool_config.script.source.type is required")
    kind = source["type"]
    if kind not in SOURCE_TYPES:
        raise ToolError(
            f"{tool}: tool_config.script.source.type must be one of {', '.join(SOURCE_TYPES)}"
        )
    if kind in ("gcs", "s3"):
        raise ToolError(
            f"{tool}: script source {kind!r} is not supported by this worker (file and http are)"
        )
    encoding = str(script.get("encoding") or "utf-8")
    uri = _rendered(script.get("uri"), render)
    if kind == "file":
        if not uri:
            raise ToolError(f"{tool}: tool_config.script.uri (a file path) is required")
        return _read_file(uri, tool, encoding, (confinement or Confinement()).script_dir)
    url = _rendered(source.get("endpoint"), render) or uri
    if not url:
        raise ToolError(f"{tool}: tool_config.script.source.endpoint or script.uri is required")
    return _fetch(url, source, tool, render, (timeout, confinement or Confinement()))


def command_script(
    command: Command, tool: str, timeout: float, confinement: Confinement | None
) -> str:
    """The script of ``command``'s tool, its templates rendered against the command's context."""
    context = command_context(command)
    return load_script(
        command.tool_config,
        tool,
        render=lambda t: render_text(t, context),
        timeout=timeout,
        confinement=confinement,
    )


def _rendered(value: Any, render: Render | None) -> str:
    if value is None:
        return ""
    text = str(value)
    if render is not None and ("{{" in text or "{%" in text):
        text = render(text)
    return text.strip()


def _read_file(uri: str, tool: str, encoding: str, script_dir: str | None) -> str:
    if script_dir is None:
        raise ToolError(
            f"{tool}: file scripts are refused: the worker reads them only under --script-dir"
        )
    root = os.path.realpath(script_dir)
    path = os.path.realpath(os.path.join(root, uri))  # an absolute uri stays absolute
    if os.path.commonpath([root, path]) != root:
        raise ToolError(f"{tool}: script file {uri} is outside the worker's --script-dir")
    try:
        if not os.path.isfile(path):
            raise ToolError(f"{tool}: script file not found: {uri}")
        if os.path.getsize(path) > MAX_SCRIPT_BYTES:
            raise ToolError(f"{tool}: script file {uri} is larger than {MAX_SCRIPT_BYTES} bytes")
        return Path(path).read_text(encoding=encoding)
    except ToolError:
        raise
    except (OSError, UnicodeError, LookupError) as exc:
        raise ToolError(f"{tool}: cannot read script file {uri}: {exc}") from None


def _fetch(
    url: str,
    source: Mapping[str, Any],
    tool: str,
    render: Render | None,
    limits: tuple[float, Confinement],
) -> str:
    timeout, confinement = limits
    method = str(source.get("method") or "GET").upper()
    if method not in HTTP_METHODS:
        raise ToolError(f"{tool}: tool_config.script.source.method must be one of {HTTP_METHODS}")
    raw_headers = source.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise ToolError(f"{tool}: tool_config.script.source.headers must be an object")
    headers = {str(k): _rendered(v, render) for k, v in raw_headers.items()}
    limit = source.get("timeout", DEFAULT_HTTP_TIMEOUT)
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0:
        raise ToolError(f"{tool}: tool_config.script.source.timeout must be a positive number")
    try:
        with (
            httpx.Client(
                timeout=min(float(limit), timeout),
                follow_redirects=True,
                event_hooks={"request": [_guard(tool, confinement)]},
            ) as client,
            client.stream(method, url, headers=headers) as response,
        ):
            _check_status(response.status_code, url, tool)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_SCRIPT_BYTES:
                    raise ToolError(
                        f"{tool}: script at {url} is larger than {MAX_SCRIPT_BYTES} bytes"
                    )
            return body.decode(response.encoding or "utf-8", errors="replace")
    except httpx.HTTPError as exc:
        raise ToolError(
            f"{tool}: cannot fetch script from {url}: {type(exc).__name__}: {exc}"
        ) from None


def _guard(tool: str, confinement: Confinement) -> Callable[[httpx.Request], None]:
    """Refuse a request (the first or a redirect) to where the http tool may not go."""

    def check(request: httpx.Request) -> None:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        why = refusal(
            url.host,
            port,
            allow_loopback=confinement.http_allow_loopback,
            own_ports=confinement.own_ports,
        )
        if why:
            raise ToolError(f"{tool}: script source refused: {why}")

    return check


def _check_status(code: int, url: str, tool: str) -> None:
    if code == 404:
        raise ToolError(f"{tool}: HTTP 404: Script not found at {url}")
    if code in (401, 403):
        raise ToolError(f"{tool}: HTTP {code}: Access denied to {url}")
    if code >= 400:
        raise ToolError(f"{tool}: HTTP {code}: Failed to fetch script from {url}")


__all__ = ["MAX_SCRIPT_BYTES", "SOURCE_TYPES", "command_script", "has_script", "load_script"]
