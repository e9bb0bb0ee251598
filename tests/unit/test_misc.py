from __future__ import annotations

import pytest
from click.testing import CliRunner

import noetl_pgworker
from noetl_pgworker.cli import main
from noetl_pgworker.config import Settings
from noetl_pgworker.queries import all_queries, parse_queries
from noetl_pgworker.redact import redact_dsn, redact_text

pytestmark = pytest.mark.unit


def test_public_api_is_sorted_and_complete() -> None:
    assert noetl_pgworker.__all__ == sorted(noetl_pgworker.__all__)
    for name in noetl_pgworker.__all__:
        assert hasattr(noetl_pgworker, name), name
    public = {n for n in dir(noetl_pgworker) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(noetl_pgworker.__all__)


def test_every_query_is_loaded_once_and_named() -> None:
    names = set(all_queries())
    assert {
        "claim_commands",
        "write_back",
        "release_commands",
        "runtime_heartbeat",
        "enqueue_commands",
        "verify_objects",
    } <= names
    with pytest.raises(ValueError, match="defined twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(ValueError, match="empty"):
        parse_queries("-- name: a\n-- only a comment\n")


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("host=db user=u password=hunter2 dbname=x", "hunter2"),
        ("postgresql://u:hunter2@db:5432/x", "hunter2"),
        ("postgresql://u@db/x?password=hunter2", "hunter2"),
        ("host=db password='hun ter2'", "hun ter2"),
    ],
)
def test_dsn_passwords_never_show(dsn: str, secret: str) -> None:
    assert secret not in redact_dsn(dsn)
    assert "***" in redact_dsn(dsn)


def test_redact_text_removes_the_password_from_driver_messages() -> None:
    dsn = "host=db user=u password=hunter2"
    assert "hunter2" not in redact_text("connection to db failed for hunter2", dsn)


def test_settings_split_tool_kinds_and_reject_nonsense() -> None:
    assert Settings(tool_kinds="noop, python,noop").tool_kinds == ("noop", "python")
    assert Settings().tool_kinds is None  # not given: every kind the worker runs
    with pytest.raises(ValueError, match="names no tool kind"):
        Settings(tool_kinds="")  # given but empty: refused, never "every kind"
    with pytest.raises(ValueError):
        Settings(concurrency=0)


def test_help_shows_environment_variables() -> None:
    result = CliRunner().invoke(main, ["start", "--help"])
    assert result.exit_code == 0
    for env in (
        "NOETL_PGWORKER_DSN",
        "NOETL_PGWORKER_CONCURRENCY",
        "NOETL_PGWORKER_TOOL_KINDS",
        "NOETL_PGWORKER_POLL_INTERVAL",
        "NOETL_PGWORKER_DRAIN",
        "NOETL_PGWORKER_LOG_FORMAT",
    ):
        assert env in result.output


def test_unknown_tool_kind_is_a_one_line_error() -> None:
    result = CliRunner().invoke(main, ["start", "--tool-kinds", "noop,teleport"])
    assert result.exit_code == 1
    assert "unknown tool kind(s) teleport" in result.output
    assert "Traceback" not in result.output


def test_bad_json_option_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["enqueue", "--config", "{nope"])
    assert result.exit_code == 2
    assert "not valid JSON" in result.output


def test_schema_sql_prints_the_ddl() -> None:
    result = CliRunner().invoke(main, ["schema", "sql", "--with-noetl-tables"])
    assert result.exit_code == 0
    assert "CREATE TABLE IF NOT EXISTS noetl.command" in result.output
    assert "pgworker_command_notify" in result.output


def test_rate_tracker_reports_commands_per_second_per_worker() -> None:
    from noetl_pgworker.status import QueueStatus, RateTracker, WorkerInfo, format_status

    def status(done: int) -> QueueStatus:
        return QueueStatus(
            {"COMPLETED": {"noop": done}}, None, [WorkerInfo("w1", "ready", 8, 1.0, 2, done, 0)]
        )

    rates = RateTracker(window=60)
    assert rates.update(0.0, status(0)) == {"w1": 0.0}
    assert rates.update(10.0, status(500)) == {"w1": 50.0}
    assert rates.update(100.0, status(800)) == {"w1": 0.0}  # older readings fall out of the window
    table = format_status(status(800), {"w1": 12.5})
    assert "w1" in table and "12.5" in table and "stuck past the 120 s lease: 0" in table


def test_gather_and_start_write_delay_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import noetl_pgworker.cli as cli
    import noetl_pgworker.worker as worker_module

    seen: list[Settings] = []

    class Captured:
        def __init__(self, settings: Settings, **_: object) -> None:
            seen.append(settings)

        def stop(self) -> None:
            pass

        def keep_unwritten(self) -> int:
            return 0

        def run(self) -> object:
            return type("Summary", (), {"clean": True})()

    monkeypatch.setattr(worker_module, "Worker", Captured)
    monkeypatch.setattr(cli, "harden_process", lambda: None)
    monkeypatch.setattr(cli, "_install_signal_handlers", lambda _stop, _deadline: None)
    args = ["start", "--dsn", "host=nowhere", "--worker-id", "w"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (seen[0].write_gather, seen[0].claim_gather, seen[0].start_write_delay) == (
        0.015,
        0.03,
        0.2,
    )
    more = ["--gather", "0", "--start-write-delay", "0"]
    assert CliRunner().invoke(main, [*args, *more]).exit_code == 0
    assert (seen[1].write_gather, seen[1].claim_gather, seen[1].start_write_delay) == (0, 0, 0)
    bad = CliRunner().invoke(main, [*args, "--gather", "2"])
    assert bad.exit_code == 2 and "--gather" in bad.output


def test_the_default_worker_id_is_the_host_and_the_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    monkeypatch.delenv("NOETL_PGWORKER_INSTANCE", raising=False)
    assert Settings().worker_id == socket.gethostname()  # the same at every start
    monkeypatch.setenv("NOETL_PGWORKER_INSTANCE", "2")
    assert Settings().worker_id == f"{socket.gethostname()}-2"
    assert Settings(worker_id="given").worker_id == "given"
