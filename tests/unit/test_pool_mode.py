"""--pool-mode: what the worker's connections send and prepare, per mode."""

from __future__ import annotations

import psycopg
import pytest
from click.testing import CliRunner

from noetl_pgworker.cli import main
from noetl_pgworker.config import Settings
from noetl_pgworker.db import connect_kwargs, pooler_hint
from noetl_pgworker.session import ClaimSession

pytestmark = pytest.mark.unit


def test_transaction_pooling_prepares_no_statement() -> None:
    assert "prepare_threshold" not in connect_kwargs("w", 10)
    assert "prepare_threshold" not in connect_kwargs("w", 10, "session")
    assert connect_kwargs("w", 10, "transaction")["prepare_threshold"] is None


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_pooler_gets_no_options_startup_parameter(mode: str) -> None:
    # PgBouncer refuses a startup parameter it does not know (`options` among them).
    assert "options" not in connect_kwargs("w", 10, mode)  # type: ignore[arg-type]


def test_the_claim_session_takes_session_locks_only_on_a_session() -> None:
    direct = ClaimSession("", worker_id="w")
    assert direct.session_locks and direct._worker_id == "w"
    pooled = ClaimSession("", worker_id="w", pool_mode="transaction")
    assert not pooled.session_locks and pooled._worker_id is None
    assert pooled._kwargs["prepare_threshold"] is None
    pooled.done([1, 2])  # nothing to unlock later
    assert pooled.held_locks() == set()


def test_pool_mode_setting_and_option() -> None:
    assert Settings().pool_mode == "direct"
    with pytest.raises(ValueError):
        Settings(pool_mode="statement")  # type: ignore[arg-type]
    out = CliRunner().invoke(main, ["start", "--help"]).output
    assert "--pool-mode" in out and "NOETL_PGWORKER_POOL_MODE" in out


def test_an_unannounced_transaction_pooler_is_named() -> None:
    exc = psycopg.errors.DuplicatePreparedStatement('prepared statement "_pg3_1" already exists')
    assert "--pool-mode transaction" in pooler_hint(exc)
    assert pooler_hint(psycopg.OperationalError("connection refused")) == ""
