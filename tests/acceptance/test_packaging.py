"""What a release ships: the sdist and the wheel carry the SQL, the systemd units, the
environment example and the licence."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance
REPO = Path(__file__).resolve().parents[2]
DEPLOY = ("noetl-pgworker.service", "noetl-pgworker@.service", "worker.env.example")


def test_sdist_and_wheel_carry_the_deploy_files(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    (wheel,) = tmp_path.glob("*.whl")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in DEPLOY:
        assert f"deploy/systemd/{name}" in names
    assert "LICENSE" in names and "sql/queries.sql" in names
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = set(zf.namelist())
        metadata = next(
            zf.read(n).decode() for n in wheel_names if n.endswith(".dist-info/METADATA")
        )
    for name in DEPLOY:
        assert f"noetl_pgworker/deploy/systemd/{name}" in wheel_names
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in wheel_names)
    assert "Project-URL: Homepage" in metadata
