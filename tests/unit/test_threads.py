"""threads.join and the log records the package writes: no key of ``extra=`` may clash with a
LogRecord attribute (logging raises KeyError for those, turning a log line into a crash)."""

from __future__ import annotations

import ast
import logging
import threading
from pathlib import Path

import pytest

import noetl_pgworker
from noetl_pgworker import threads

pytestmark = pytest.mark.unit

PACKAGE = Path(noetl_pgworker.__file__).parent
RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def test_a_thread_that_does_not_stop_is_logged_by_name(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="stuck-for-the-test", daemon=True)
    stuck.start()
    try:
        with caplog.at_level(logging.ERROR, logger=threads.__name__):
            assert threads.join(stuck, 0.01) is False
    finally:
        release.set()
        stuck.join(30)
    [record] = [r for r in caplog.records if getattr(r, "action", None) == "thread_stuck"]
    assert record.thread_name == "stuck-for-the-test"  # type: ignore[attr-defined]
    assert threads.join(stuck, 1) is True


def _extra_keys(tree: ast.AST) -> list[tuple[int, str]]:
    """Constant keys of every ``extra={...}`` keyword and of dicts returned by ``_log_extra``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        dicts: list[ast.Dict] = []
        if (
            isinstance(node, ast.keyword)
            and node.arg == "extra"
            and isinstance(node.value, ast.Dict)
        ):
            dicts.append(node.value)
        if isinstance(node, ast.FunctionDef) and "extra" in node.name:
            dicts.extend(
                n.value
                for n in ast.walk(node)
                if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict)
            )
        for d in dicts:
            found.extend(
                (k.lineno, k.value)
                for k in d.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            )
    return found


def test_no_log_extra_key_is_a_log_record_attribute() -> None:
    clashes = [
        f"{path.relative_to(PACKAGE)}:{line} {key!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, key in _extra_keys(ast.parse(path.read_text(encoding="utf-8")))
        if key in RESERVED
    ]
    assert clashes == []
