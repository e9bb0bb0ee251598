"""An ``auth`` alias's secrets go only where they belong, and never come back in results."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from noetl_pgworker.credentials import EnvCredentials

from .test_tools import run

pytestmark = pytest.mark.integration

TOKEN = "tok-0123456789"
KEY = "key-0123456789"
PASSWORD = "pw-0123456789"


class Recorder(BaseHTTPRequestHandler):
    """/echo (/fail: with a 500) answers with the request's headers; /go?to=URL redirects."""

    seen: list[dict[str, str]]

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.seen.append(headers)
        if self.path.startswith("/go?to="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/go?to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"path": self.path, "headers": headers}).encode()
        self.send_response(500 if self.path == "/fail" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Echo-Key", headers.get("x-api-key", ""))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Origin:
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        handler = type("H", (Recorder,), {"seen": self.seen})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def origins() -> Iterator[tuple[Origin, Origin]]:
    a, b = Origin(), Origin()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def provider(tmp_path: Path) -> EnvCredentials:
    creds = {
        "api": {"token": TOKEN, "headers": {"X-Api-Key": KEY}, "allowed_hosts": ["127.0.0.1"]},
        "basic": {"username": "bob", "password": PASSWORD, "allowed_hosts": ["127.0.0.1"]},
        "pinned": {"headers": {"X-Api-Key": KEY}, "allowed_hosts": ["api.example.com"]},
        "local": {"headers": {"X-Api-Key": KEY}, "allowed_hosts": ["LOCALHOST", "127.0.0.1"]},
    }
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(creds))
    return EnvCredentials({"NOETL_PGWORKER_CREDENTIALS": str(path)})


@pytest.mark.parametrize("alias", ["api", "basic"])
def test_alias_credentials_do_not_follow_a_cross_origin_redirect(
    origins: tuple[Origin, Origin], provider: EnvCredentials, alias: str
) -> None:
    a, b = origins
    out = run("http", {"url": f"{a.url}/go?to={b.url}/echo", "auth": alias}, credentials=provider)
    assert out.ok, out.error
    assert "authorization" in a.seen[0] or "x-api-key" in a.seen[0]
    assert b.seen and "authorization" not in b.seen[0] and "x-api-key" not in b.seen[0]


def test_alias_credentials_follow_a_same_origin_redirect(
    origins: tuple[Origin, Origin], provider: EnvCredentials
) -> None:
    a, _ = origins
    out = run("http", {"url": f"{a.url}/go?to=/echo", "auth": "api"}, credentials=provider)
    assert out.ok, out.error
    assert a.seen[1]["x-api-key"] == KEY and a.seen[1]["authorization"] == f"Bearer {TOKEN}"


def test_too_many_redirects_fail_readably(
    origins: tuple[Origin, Origin], provider: EnvCredentials
) -> None:
    a, _ = origins
    out = run("http", {"url": f"{a.url}/go?to=/go?to=/go?to=/go?to=/echo", "max_redirects": 2})
    assert not out.ok and "redirect" in (out.error or "").lower()


@pytest.mark.parametrize("alias", ["api", "basic"])
def test_secrets_echoed_by_the_server_are_not_stored(
    origins: tuple[Origin, Origin], provider: EnvCredentials, alias: str
) -> None:
    a, _ = origins
    out = run("http", {"url": f"{a.url}/echo", "auth": alias}, credentials=provider)
    assert out.ok, out.error
    stored = json.dumps(out.data)
    assert a.seen[0].get("x-api-key") == KEY or a.seen[0]["authorization"].startswith("Basic ")
    for secret in (TOKEN, KEY, PASSWORD, "Ym9iOnB3LTAxMjM0NTY3ODk"):
        assert secret not in stored
    assert "***" in stored


def test_secrets_echoed_in_a_failed_response_are_not_stored(
    origins: tuple[Origin, Origin], provider: EnvCredentials
) -> None:
    a, _ = origins
    out = run("http", {"url": f"{a.url}/fail", "auth": "api"}, credentials=provider)
    assert not out.ok and out.data["status_code"] == 500
    assert KEY not in json.dumps(out.data) and TOKEN not in (out.error or "")


def test_an_alias_with_allowed_hosts_refuses_other_hosts(
    origins: tuple[Origin, Origin], provider: EnvCredentials
) -> None:
    a, _ = origins
    out = run("http", {"url": f"{a.url}/echo", "auth": "pinned"}, credentials=provider)
    assert not out.ok and out.error_type == "credentials"
    assert "'pinned'" in (out.error or "") and "127.0.0.1" in (out.error or "")
    assert "api.example.com" in (out.error or "") and not a.seen
    ok = run("http", {"url": f"{a.url}/echo", "auth": "local"}, credentials=provider)
    assert ok.ok and a.seen[0]["x-api-key"] == KEY
