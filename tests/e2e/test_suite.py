"""NoETL's own regression suite on a real NoETL server (``NOETL_E2E_SUITE``); see suite.py.

One test per playbook of the suite's config; the playbooks run together (a few at a time)
once per session, each test then reports its own playbook's verdict.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import suite
from .conftest import NoetlServer, WorkerProcess, pg_credential

ROOT = Path(suite.SUITE) if suite.SUITE else Path()
NAMES = [pb.name for pb in suite.load_suite(ROOT)[0]] if suite.SUITE else []

pytestmark = pytest.mark.timeout(0)  # each playbook has its own deadline (SUITE_TIMEOUT)


@pytest.fixture(scope="session")
def suite_outcomes(
    noetl: NoetlServer,
    worker: WorkerProcess | None,
    worker_log_dir: Path,
) -> Iterator[dict[str, suite.Outcome]]:
    pagination = suite.PaginationServer(
        ROOT, suite.SUITE_PYTHON, worker_log_dir / "paginated_api.log"
    )
    public = suite.PublicHosts(ROOT)
    try:
        run = suite.SuiteRun(noetl, ROOT, public.base)
        run.register_credentials(pg_credential(noetl))
        outcomes = run.run_all()
        suite.SUMMARY[:] = suite.summary(outcomes)
        yield outcomes
    finally:
        public.stop()
        pagination.stop()


@pytest.mark.parametrize("name", NAMES)
def test_suite_playbook(suite_outcomes: dict[str, suite.Outcome], name: str) -> None:
    if suite.SUITE_ONLY and name not in suite.SUITE_ONLY:
        pytest.skip("not in NOETL_E2E_SUITE_ONLY")
    outcome = suite_outcomes[name]
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert outcome.passed, (
        f"{name} (execution {outcome.execution_id}, {outcome.terminal}):"
        f" {'; '.join(outcome.problems)}; errors: {outcome.errors[:3]}"
    )
