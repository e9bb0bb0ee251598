"""Bounds against a silent network (netguard) and incarnation names (incarnation)."""

from __future__ import annotations

import pytest

from noetl_pgworker import incarnation, netguard

pytestmark = pytest.mark.unit


def test_client_kwargs_bound_detection_by_the_timeout() -> None:
    kw = netguard.client_kwargs("host=db", 20)
    assert kw["keepalives"] == 1
    assert kw["tcp_user_timeout"] == 20_000
    # An idle connection: idle + interval * count stays within the timeout.
    assert kw["keepalives_idle"] + kw["keepalives_interval"] * kw["keepalives_count"] <= 20


def test_client_kwargs_leave_what_the_dsn_says() -> None:
    kw = netguard.client_kwargs("host=db tcp_user_timeout=90000 keepalives_idle=60", 20)
    assert "tcp_user_timeout" not in kw and "keepalives_idle" not in kw
    assert kw["keepalives_interval"] == 3
    url = netguard.client_kwargs("postgresql://u@db/x?keepalives=0", 20)
    assert "keepalives" not in url


def test_zero_timeout_sets_nothing() -> None:
    assert netguard.client_kwargs("host=db", 0) == {}
    assert netguard.server_settings(0) == {}


def test_server_settings_mirror_the_client() -> None:
    s = netguard.server_settings(12)
    assert s == {
        "tcp_keepalives_idle": "6",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "12000",
    }


def test_application_name_keeps_the_token_whole() -> None:
    name = incarnation.application_name("claim", "w" * 100, "0123abcd")
    assert len(name.encode()) <= 63
    assert name.startswith("noetl-pgworker-claim@0123abcd:www")
    assert incarnation.token_of(name) == "0123abcd"
    assert incarnation.token_of(incarnation.application_name("", "x", "ffffeeee")) == "ffffeeee"


@pytest.mark.parametrize(
    "name", [None, "", "noetl-pgworker-claim:w1", "psql", "a@b", "x@0123abcd", "x@012:w"]
)
def test_names_without_a_token(name: str | None) -> None:
    assert incarnation.token_of(name) is None


def test_tokens_differ() -> None:
    assert len({incarnation.new_token() for _ in range(100)}) == 100
