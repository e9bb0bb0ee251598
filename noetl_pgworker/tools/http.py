"""``http``: call an HTTP API.

Input: ``method`` (GET), ``url`` or ``endpoint``, ``headers``, ``params``, ``payload`` |
``body`` | ``json`` (a JSON body), ``data`` (a form, or raw text), ``verify_ssl`` (true),
``follow_redirects`` (true), ``max_redirects`` (20), ``auth`` (a credential alias: its
``headers``, ``token`` as a bearer token, or ``username``/``password`` for basic auth). Output
``{status_code, headers, url, elapsed, data}``, ``data`` parsed when the response is JSON. A
non-2xx status fails the command with ``HTTP <code>: <reason>`` and still carries the response.
One pooled client per worker; responses over 32 MiB are refused.

An alias's credentials go only to the hosts it names (``allowed_hosts``, else its
``base_url``'s host): a request elsewhere, or by an alias that names none, is refused; a
redirect to another origin drops every header the alias added; its secret values are
replaced by ``***`` in what the tool returns. A request (or redirect) to a loopback or
link-local address is refused unless the worker allows it (``--http-allow-loopback``), and to
the worker's own metrics port always (:mod:`~noetl_pgworker.tools.netcheck`): checked before
each request, and again where the connection is made (the name resolved once, the connection
made to a checked address).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..credentials import Credential, auth_alias
from ..errors import CredentialError, ToolError, ToolTimeout
from ..models import Command
from ..render import render_http
from .base import ToolContext
from .netcheck import checked_transport, refusal

MAX_RESPONSE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_REDIRECTS = 20


def redact_url(url: str) -> str:
    """The URL without user information (a password may be in it)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


class HttpTool:
    kind = "http"

    def __init__(self, *, allow_loopback: bool = False, own_ports: Sequence[int] = ()) -> None:
        self._clients: dict[bool, httpx.Client] = {}
        self._lock = threading.Lock()
        self.allow_loopback = allow_loopback
        self.own_ports = tuple(own_ports)

    def check(self, url: httpx.URL) -> None:
        """ToolError if ``url`` goes where a command may not send a request."""
        port = url.port if url.port is not None else _port(url)
        why = refusal(
            url.host, port or 0, allow_loopback=self.allow_loopback, own_ports=self.own_ports
        )
        if why:
            raise ToolError(f"http: refused: {why}")

    def _client(self, verify: bool) -> httpx.Client:
        with self._lock:
            client = self._clients.get(verify)
            if client is None:
                transport = checked_transport(
                    lambda: (self.allow_loopback, self.own_ports),
                    verify=verify,
                    limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
                )
                client = self._clients[verify] = httpx.Client(
                    transport=transport, headers={"User-Agent": "noetl-pgworker"}
                )
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def run(self, command: Command, ctx: ToolContext) -> dict[str, Any]:
        cfg = render_http(command, {**command.args, **command.tool_config})
        url = cfg.get("url") or cfg.get("endpoint")
        if not isinstance(url, str) or not url:
            raise ToolError("http: tool_config.url (or endpoint) is required")
        method = str(cfg.get("method") or "GET").upper()
        headers = _str_map(cfg.get("headers"), "headers")
        params = cfg.get("params")
        if params is not None and not isinstance(params, dict):
            raise ToolError("http: tool_config.params must be an object")
        alias = _AliasAuth.of(cfg, ctx, headers)
        follow = bool(cfg.get("follow_redirects", True))
        try:
            max_redirects = int(cfg.get("max_redirects", DEFAULT_MAX_REDIRECTS))
        except (TypeError, ValueError):
            raise ToolError("http: tool_config.max_redirects must be a number") from None
        shown = redact_url(url)
        client = self._client(bool(cfg.get("verify_ssl", True)))
        try:
            request = client.build_request(
                method, url, headers=headers, params=params, timeout=ctx.remaining(), **_body(cfg)
            )
            alias.check_host(request.url.host)
            response, content = _send(
                client, request, alias, max_redirects if follow else None, method, shown, self.check
            )
        except httpx.TimeoutException:
            raise ToolTimeout(f"http: {method} {shown} timed out after {ctx.timeout:g} s") from None
        except httpx.ConnectError as exc:
            raise ToolError(f"http: cannot connect to {shown}: {exc}") from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise ToolError(f"http: invalid url {shown}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"http: {method} {shown} failed: {type(exc).__name__}: {exc}") from None
        out: dict[str, Any] = {
            "status_code": response.status_code,
            "headers": dict(response.headers),
            "url": redact_url(str(response.url)),
            "elapsed": response.elapsed.total_seconds(),
            "data": _decode(content, response),
        }
        if alias.cred is not None:  # a server may echo what it was sent
            out = alias.cred.scrub(out)
        if not response.is_success:
            raise ToolError(f"HTTP {response.status_code}: {response.reason_phrase}", data=out)
        return out


class _AliasAuth:
    """What a credential alias adds to a request: headers, basic auth, the hosts it may reach."""

    def __init__(self) -> None:
        self.cred: Credential | None = None
        self.auth: tuple[str, str] | None = None
        self.headers: set[str] = set()  # names (lower case) of the headers the alias adds

    @classmethod
    def of(cls, cfg: dict[str, Any], ctx: ToolContext, headers: dict[str, str]) -> _AliasAuth:
        """The alias of ``cfg`` (if any), its headers added to ``headers``."""
        self = cls()
        alias = auth_alias(cfg)
        if not alias:
            return self
        cred = self.cred = ctx.credentials.get(alias)
        headers.update(cred.headers)
        self.headers = {k.lower() for k in cred.headers}
        if cred.token and "authorization" not in {k.lower() for k in headers}:
            headers["Authorization"] = f"Bearer {cred.token}"
            self.headers.add("authorization")
        if cred.username is not None and cred.password is not None:
            self.auth = (cred.username, cred.password)
            self.headers.add("authorization")
        return self

    def check_host(self, host: str) -> None:
        cred = self.cred
        if cred is not None and not cred.allows_host(host):
            raise CredentialError(f"http: {cred.refusal(host)}")


def _body(cfg: dict[str, Any]) -> dict[str, Any]:
    """httpx's body keyword: ``json`` of payload|body|json, else ``data`` (form) or ``content``."""
    for key in ("payload", "body", "json"):
        if cfg.get(key) is not None:
            return {"json": cfg[key]}
    form = cfg.get("data")
    if isinstance(form, dict):
        return {"data": form}
    if isinstance(form, str):
        return {"content": form}
    return {}


def _send(
    client: httpx.Client,
    request: httpx.Request,
    alias: _AliasAuth,
    max_redirects: int | None,
    method: str,
    shown: str,
    check: Callable[[httpx.URL], None],
) -> tuple[httpx.Response, bytes]:
    """Send ``request``, following up to ``max_redirects`` redirects (None: none); the last
    response (closed) and its body, refused over MAX_RESPONSE_BYTES. ``check`` refuses a URL
    (the first and every redirect's) before it is sent to."""
    first_url = request.url
    redirects = 0
    while True:
        check(request.url)
        response = client.send(request, auth=alias.auth if redirects == 0 else None, stream=True)
        try:
            next_request = response.next_request if max_redirects is not None else None
            if next_request is None:
                return response, _read_limited(response, shown)
        finally:
            response.close()
        redirects += 1
        if redirects > (max_redirects or 0):
            raise ToolError(f"http: {method} {shown}: more than {max_redirects} redirects")
        # httpx drops only Authorization on a cross-origin redirect: drop every header
        # the alias added, so its secrets go nowhere but where they were meant for.
        if alias.headers and not _same_site(first_url, next_request.url):
            for name in alias.headers:
                next_request.headers.pop(name, None)
        request = next_request


def _read_limited(response: httpx.Response, shown: str) -> bytes:
    content = bytearray()
    for chunk in response.iter_bytes():
        content += chunk
        if len(content) > MAX_RESPONSE_BYTES:
            raise ToolError(
                f"http: response from {shown} is larger than"
                f" {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB"
            )
    return bytes(content)


def _same_site(origin: httpx.URL, url: httpx.URL) -> bool:
    """Whether ``url`` is ``origin``'s scheme, host and port (or its https upgrade)."""
    if origin.host != url.host:
        return False
    if origin.scheme == url.scheme:
        return _port(origin) == _port(url)
    return (origin.scheme, _port(origin), url.scheme, _port(url)) == ("http", 80, "https", 443)


def _port(url: httpx.URL) -> int | None:
    return url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme)


def _decode(content: bytes, response: httpx.Response) -> Any:
    ctype = response.headers.get("content-type", "")
    text = content.decode(response.encoding or "utf-8", errors="replace")
    if "json" in ctype:
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return text
    return text


def _str_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ToolError(f"http: tool_config.{name} must be an object")
    return {str(k): str(v) for k, v in value.items()}
