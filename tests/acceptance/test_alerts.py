"""The alert rules in deploy/prometheus, checked and unit-tested by Prometheus' promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ..helpers import unavailable

pytestmark = pytest.mark.acceptance
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool is missing (apt-get install prometheus)")
    return found


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "noetl-pgworker.rules.yml"),
        ("test", "rules", "noetl-pgworker.rules.test.yml"),
    ],
    ids=["check", "test"],
)
def test_alert_rules(args: tuple[str, ...]) -> None:
    r = subprocess.run(
        [promtool(), *args],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
