"""The container image (Containerfile), built with `make image`'s script and run with podman:
its version, its user, `schema apply`, a drain on a read-only root file system, and a stop
with a command running.

Needs podman (as root) and, for the local base image, debootstrap; without them the tests are
skipped saying why, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest

from noetl_pgworker.enqueue import enqueue

from ..helpers import scalar, unavailable, wait_until

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/noetl-pgworker:smoke-test"
CONTAINERS_CONF = REPO / "deploy" / "container" / "containers.conf"
#: What Kubernetes gives the pod in deploy/kubernetes/: a read-only root, every capability
#: dropped, no privilege gain, a writable /tmp and spool directory and nothing else.
LOCKED_DOWN = [
    "--network=host",
    "--read-only",
    "--read-only-tmpfs=false",
    "--tmpfs=/tmp:rw,mode=1777,size=64m",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]


def _unavailable() -> str | None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed: the container smoke test needs podman, runc"
            " and debootstrap (apt-get install podman buildah runc debootstrap)"
        )
    if os.geteuid() != 0:
        return "the container smoke test runs podman as root (rootless podman has no host network)"
    return None


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    proc = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def image() -> str:
    why = _unavailable()
    if why is not None:
        unavailable(why)
    env = {**os.environ, "IMAGE": IMAGE, "IMAGE_BASE": "local", "PYTHON": sys.executable}
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    proc = subprocess.run(
        ["bash", "scripts/image.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stderr.strip().splitlines()[-1])  # the build time and size, for the record
    return IMAGE


@pytest.fixture
def container_names() -> Iterator[list[str]]:
    """Containers started by a test; removed (killed if still running) at its end."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_image_version_and_unprivileged_user(image: str) -> None:
    out = podman("run", "--rm", image, "--version").stdout
    assert out.strip() == f"noetl-pgworker, version {version('noetl-pgworker')}"
    uid = podman("run", "--rm", *LOCKED_DOWN, "--entrypoint", "id", image, "-u").stdout.strip()
    assert uid.isdigit() and int(uid) != 0, uid
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert config["User"] == f"{uid}:{uid}"
    assert config["Entrypoint"] == ["noetl-pgworker"]
    # A read-only root and nothing writable on /tmp: one clear line, exit 1, before anything.
    bare = ["--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL"]
    proc = podman("run", "--rm", *bare, image, "start", "--drain", check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("noetl-pgworker: error: no writable temporary directory")


def test_image_applies_the_schema_and_drains_on_a_read_only_root(
    image: str, empty_dsn: str
) -> None:
    run = ["run", "--rm", *LOCKED_DOWN, image]
    podman(*run, "schema", "apply", "--with-noetl-tables", "--dsn", empty_dsn)
    assert podman(*run, "schema", "verify", "--dsn", empty_dsn).returncode == 0
    podman(*run, "enqueue", "--dsn", empty_dsn, "--tool-kind", "noop", "--count", "20")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        # python and shell run in the fork server's processes: sockets and files under /tmp.
        code = "def main(x):\n    return x * 2\n"
        enqueue(conn, tool_kind="python", tool_config={"code": code}, args={"x": 21}, count=5)
        enqueue(conn, tool_kind="shell", tool_config={"command": "echo hi > out.txt; cat out.txt"})
    drained = podman(*run, "start", "--dsn", empty_dsn, "--drain", "--worker-id", "smoke-drain")
    assert "26 completed, 0 failed" in drained.stderr, drained.stderr
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tool_kind, status, worker_id, count(*) FROM noetl.command"
            " GROUP BY 1, 2, 3 ORDER BY 1"
        ).fetchall()
        assert rows == [
            ("noop", "COMPLETED", "smoke-drain", 20),
            ("python", "COMPLETED", "smoke-drain", 5),
            ("shell", "COMPLETED", "smoke-drain", 1),
        ]
        data = conn.execute(
            "SELECT DISTINCT result->'context'->>'data' FROM noetl.command"
            " WHERE tool_kind = 'python'"
        ).fetchall()
        assert data == [("42",)]
        stdout = scalar(
            conn, "SELECT result->'context'->>'stdout' FROM noetl.command WHERE tool_kind = 'shell'"
        )
        assert stdout == "hi\n"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def test_stop_with_a_command_running_completes_it(
    image: str, dsn: str, container_names: list[str]
) -> None:
    """`podman stop -t` above --shutdown-timeout: the running command ends COMPLETED, the
    queued one is PENDING (never claimed, or put back), the worker goes offline and exits 0."""
    name = f"noetl-pgworker-smoke-{uuid.uuid4().hex[:8]}"
    container_names.append(name)
    port = _free_port()
    shutdown_timeout = 10
    podman(
        "run", "--detach", "--name", name, *LOCKED_DOWN, image,
        "start", "--dsn", dsn, "--worker-id", name, "--concurrency", "1",
        "--shutdown-timeout", str(shutdown_timeout),
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
    )  # fmt: skip
    wait_until(lambda: _ready(port), timeout=60, interval=0.2)
    sleeper = "import time\ndef main(seconds):\n    time.sleep(seconds)\n    return 'slept'\n"
    with psycopg.connect(dsn, autocommit=True) as conn:
        running = enqueue(
            conn, tool_kind="python", tool_config={"code": sleeper}, args={"seconds": 4}
        ).command_ids[0]
        wait_until(
            lambda: scalar(conn, "SELECT status FROM noetl.command WHERE command_id = %s",
                           (running,)) == "RUNNING",
            timeout=60, interval=0.05,
        )  # fmt: skip
        queued = enqueue(
            conn, tool_kind="python", tool_config={"code": sleeper}, args={"seconds": 1}
        ).command_ids[0]
        t0 = time.monotonic()
        podman("stop", "--time", str(shutdown_timeout + 20), name, timeout=90)
        stopped_after = time.monotonic() - t0
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, podman("logs", name, check=False).stderr
        # Well inside the stop timeout: SIGTERM did it, not the SIGKILL after it.
        assert stopped_after < shutdown_timeout + 20, stopped_after
        rows = dict(
            conn.execute(
                "SELECT command_id, status FROM noetl.command WHERE command_id = ANY(%s)",
                ([running, queued],),
            ).fetchall()
        )
        assert rows[running] == "COMPLETED"
        assert rows[queued] == "PENDING"
        result = scalar(
            conn, "SELECT result->'context'->>'data' FROM noetl.command WHERE command_id = %s",
            (running,),
        )  # fmt: skip
        assert result == "slept"
        status = scalar(conn, "SELECT status FROM noetl.runtime WHERE name = %s", (name,))
        assert status == "offline"
