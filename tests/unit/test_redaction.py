"""Secrets never reach logs or stored errors, whatever text they hide in."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from noetl_pgworker import logs
from noetl_pgworker.credentials import Credential
from noetl_pgworker.db import connect
from noetl_pgworker.errors import DatabaseUnavailable
from noetl_pgworker.jsontext import clean_text
from noetl_pgworker.redact import redact_dsn, redact_secrets, redact_text

SECRET = "pw-s3cret"


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://u:{SECRET}@[::1/db",
        f'end of string in URI: "postgresql://u:{SECRET}@[::1/db"',
        f"cannot connect (postgres://alice:{SECRET}@db.internal:5432/app?sslmode=require)",
        f"host=h password={SECRET} dbname=d",
        f"host=h PASSWORD = '{SECRET} with space' dbname=d",
        f"host=h sslpassword={SECRET}",
        f"postgresql://u@h/db?sslmode=require&password={SECRET}&x=1",
        f"https://user:{SECRET}@api.example.com/v1",
        f"https://{SECRET}@api.example.com/v1",
        f"two: postgresql://a:{SECRET}@h1/x and mysql://b:{SECRET}@h2/y",
        f"postgresql://u:{SECRET}@@host/db",
    ],
)
def test_redact_secrets_removes_passwords_from_any_text(text: str) -> None:
    out = redact_secrets(text)
    assert SECRET not in out and "***" in out


def test_redact_secrets_keeps_what_is_not_secret() -> None:
    assert redact_secrets("postgresql://alice:x@h:5432/db") == "postgresql://alice:***@h:5432/db"
    assert redact_secrets("postgresql://alice@h/db") == "postgresql://alice@h/db"
    plain = "GET http://h:8080/p?email=a@b.example failed: password policy, host=h port=5"
    assert redact_secrets(plain) == plain


def test_an_unparseable_dsn_leaks_nothing_through_the_driver_message() -> None:
    dsn = f"postgresql://u:{SECRET}@[::1/db"
    with pytest.raises(DatabaseUnavailable) as err:
        connect(dsn, connect_timeout=1)
    assert SECRET not in err.value.message and "u:***@" in err.value.message
    assert SECRET not in redact_dsn(dsn)
    assert SECRET not in redact_text(f"bad: {dsn}", dsn)


def test_redact_text_removes_the_password_of_an_unparseable_dsn_anywhere() -> None:
    dsn = f"postgresql://u:{SECRET}/x@[::1/db"  # a '/' in the password: not even a URL
    assert SECRET not in redact_text(f"port {SECRET}/x is not a number", dsn)


def test_stored_errors_are_redacted() -> None:
    text = clean_text(f"could not connect: postgresql://u:{SECRET}@h/db password={SECRET}")
    assert text is not None and SECRET not in text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    names = ("noetl_pgworker", "psycopg")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    levels = {n: logging.getLogger(n).level for n in (*names, "psycopg.pool")}
    yield
    for n, (handlers, propagate) in saved.items():
        logging.getLogger(n).handlers[:] = handlers
        logging.getLogger(n).propagate = propagate
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def _log_everything() -> None:
    log = logging.getLogger("noetl_pgworker.test")
    log.warning("cannot connect to %s", f"postgresql://u:{SECRET}@[::1/db")
    log.error("failed: password=%s", SECRET)
    log.info("with extra", extra={"dsn": f"postgresql://u:{SECRET}@h/db"})
    try:
        raise RuntimeError(f"boom postgresql://u:{SECRET}@h/db")
    except RuntimeError:
        log.exception("it broke")
    logging.getLogger("psycopg.pool").error("pool: %s", f"host=h password={SECRET}")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_log_record_is_redacted(capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    logs.configure("info", fmt)
    _log_everything()
    err = capsys.readouterr().err
    assert SECRET not in err
    assert err.count("u:***@") >= 3 and "password=***" in err and "pool:" in err
    if fmt == "json":
        lines = [json.loads(line) for line in err.splitlines()]
        assert len(lines) == 5 and "exception" in lines[3]


def test_a_credential_scrubs_its_secrets_from_values() -> None:
    cred = Credential.parse(
        "api",
        {
            "token": "tok-123456",
            "headers": {"X-Api-Key": "key-456789"},
            "username": "bob",
            "password": "hunter22",
        },
    )
    value = {
        "headers": {"authorization": "Bearer tok-123456", "x-api-key": "key-456789"},
        "list": ["key-456789!", 1, None, {"k": "Basic Ym9iOmh1bnRlcjIy"}],
        "key-456789": "as a key",
    }
    scrubbed = cred.scrub(value)
    assert "tok-123456" not in json.dumps(scrubbed) and "key-456789" not in json.dumps(scrubbed)
    assert "hunter22" not in json.dumps(scrubbed) and "Ym9iOmh1bnRlcjIy" not in json.dumps(scrubbed)
    assert scrubbed["headers"]["authorization"] == "Bearer ***"
    assert scrubbed["list"][:3] == ["***!", 1, None]


@pytest.mark.parametrize("args", [["schema", "verify", "-v"], ["start", "--drain", "-v"]])
def test_the_cli_shows_no_password_of_an_unparseable_dsn(args: list[str]) -> None:
    dsn = f"postgresql://u:{SECRET}@[::1/db"
    r = subprocess.run(
        [sys.executable, "-m", "noetl_pgworker", *args, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1 and "u:***@" in r.stderr
    assert SECRET not in r.stderr + r.stdout
