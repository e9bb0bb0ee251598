"""Where a command's HTTP request may go, and the hosts a credential is bound to."""

from __future__ import annotations

import socket

import pytest

from noetl_pgworker.credentials import Credential
from noetl_pgworker.server_credentials import credential_from, normalise
from noetl_pgworker.tools.netcheck import refusal

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "127.1.2.3", "0.0.0.0", "::1", "169.254.169.254", "fe80::1"]
)
def test_loopback_and_link_local_are_refused_unless_allowed(host: str) -> None:
    why = refusal(host, 80, allow_loopback=False, own_ports=())
    assert why is not None and "--http-allow-loopback" in why
    assert refusal(host, 80, allow_loopback=True, own_ports=()) is None


def test_the_workers_own_port_is_refused_even_when_loopback_is_allowed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    why = refusal("127.0.0.1", port, allow_loopback=True, own_ports=(port,))
    assert why is not None and "own port" in why
    assert refusal("127.0.0.1", port + 1, allow_loopback=True, own_ports=(port,)) is None


def test_public_addresses_and_unresolvable_names_pass() -> None:
    assert refusal("93.184.216.34", 443, allow_loopback=False, own_ports=(443,)) is None
    assert refusal("no-such-host.invalid", 80, allow_loopback=False, own_ports=()) is None


def test_a_local_alias_is_bound_to_the_hosts_it_names() -> None:
    named = Credential.parse("a", {"token": "t", "allowed_hosts": ["api.example.com"]})
    assert named.allows_host("api.example.com") and not named.allows_host("evil.example")
    based = Credential.parse("b", {"token": "t", "base_url": "https://svc.example.org/v1"})
    assert based.allowed_hosts == ("svc.example.org",) and based.allows_host("SVC.example.org")
    dsn = Credential.parse("c", "host=db.example.com user=u password=p")
    assert dsn.allowed_hosts == ("db.example.com",)
    unbound = Credential.parse("d", {"token": "t"})
    assert not unbound.allows_host("api.example.com")
    assert "names no host" in unbound.refusal("api.example.com")


def test_a_server_credential_is_bound_to_its_hosts() -> None:
    pg = credential_from(
        "pg",
        normalise(
            "pg", {"type": "postgres", "data": {"host": "db.x", "user": "u", "password": "p"}}
        ),
    )
    assert pg.allowed_hosts == ("db.x",)
    api = credential_from(
        "api",
        normalise(
            "api", {"type": "httpBearerAuth", "data": {"token": "t", "base_url": "https://api.x/"}}
        ),
    )
    assert api.allowed_hosts == ("api.x",) and api.allows_host("api.x")
    listed = credential_from(
        "l", normalise("l", {"data": {"token": "t", "allowed_hosts": "a.x, b.x"}})
    )
    assert listed.allowed_hosts == ("a.x", "b.x")
    bare = credential_from("bare", normalise("bare", {"data": {"token": "t"}}))
    assert not bare.allows_host("anything.example")


def test_a_name_that_rebinds_to_loopback_after_the_check_is_refused_where_it_connects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from noetl_pgworker.dispatcher import execute
    from noetl_pgworker.models import Command
    from noetl_pgworker.tools import ToolRegistry
    from noetl_pgworker.tools.http import HttpTool

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34"])  # the first answer public, every later one loopback

    def rebinding(host: object, *args: object, **kwargs: object) -> object:
        if host == "rebind.example":
            return real(next(answers, "127.0.0.1"), *args, **kwargs)  # type: ignore[arg-type]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    command = Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind="http",
        catalog_id=1,
        input={"tool_config": {"url": f"http://rebind.example:{port}/x"}},
    )
    try:
        out = execute(command, ToolRegistry([HttpTool()]), timeout=10)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not out.ok and "loopback" in (out.error or ""), out.error
    assert seen == []
