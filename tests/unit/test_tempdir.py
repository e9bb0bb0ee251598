"""Without a writable temporary directory (a read-only root with no volume on /tmp) the worker
cannot start its fork server: it says so in one line instead of a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from noetl_pgworker.errors import ConfigError
from noetl_pgworker.tools.process import Sandbox

pytestmark = pytest.mark.unit


def test_no_writable_temporary_directory_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    sandbox = Sandbox()
    try:
        with pytest.raises(ConfigError, match=r"no writable temporary directory .*TMPDIR"):
            sandbox.start()
    finally:
        sandbox.close()
