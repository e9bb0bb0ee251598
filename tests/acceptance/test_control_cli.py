"""Job control through the real CLI: result lines and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue

from ..helpers import scalar

pytestmark = pytest.mark.acceptance


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noetl_pgworker", *args],
        env={**os.environ, "NOETL_PGWORKER_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_show_retry_cancel_pause_resume(dsn: str, conn: psycopg.Connection[Any]) -> None:
    e = enqueue(conn, tool_kind="noop", count=2)
    first, second = (str(c) for c in e.command_ids)
    shown = cli(dsn, "show", first)
    assert shown.returncode == 0, shown.stderr
    assert f"command {first}" in shown.stdout and "PENDING" in shown.stdout
    assert "command.issued" in shown.stdout
    as_json = json.loads(cli(dsn, "show", "--json", str(e.execution_ids[0])).stdout)
    assert {c["command_id"] for c in as_json["commands"]} == {first, second}
    missing = cli(dsn, "show", "12345")
    assert missing.returncode == 1 and "no command or execution 12345" in missing.stderr

    refused = cli(dsn, "retry", first)
    assert refused.returncode == 1
    assert f"{first} is PENDING, not FAILED: nothing to retry" in refused.stderr

    cancelled = cli(dsn, "cancel", first)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"cancelled {first} (was PENDING)"
    again = cli(dsn, "cancel", "--json", first)
    assert again.returncode == 1 and json.loads(again.stdout)["ok"] is False
    usage = cli(dsn, "cancel")
    assert usage.returncode == 2 and "COMMAND_ID or --execution" in usage.stderr

    conn.execute("UPDATE noetl.command SET status = 'FAILED' WHERE command_id = %s", (second,))
    retried = cli(dsn, "retry", second)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"retried {second}: PENDING, attempt 2"
    status = scalar(conn, "SELECT status FROM noetl.command WHERE command_id = %s", (second,))
    assert status == "PENDING"

    paused = cli(dsn, "pause", "python")
    assert paused.returncode == 0 and paused.stdout.startswith("paused python for every worker")
    assert cli(dsn, "resume", "python").stdout.strip() == "resumed python: workers claim it again"
    assert cli(dsn, "resume", "python").stdout.strip() == "python was not paused"
