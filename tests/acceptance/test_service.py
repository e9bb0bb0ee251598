"""Running as a service: sd_notify, the watchdog, metrics, JSON logs, systemd unit, least
privilege."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from noetl_pgworker import schema
from noetl_pgworker.enqueue import enqueue
from noetl_pgworker.sdnotify import Notifier

from ..conftest import RunningWorker
from ..helpers import all_terminal, count_status, insert_raw_command, unavailable, wait_until

pytestmark = pytest.mark.acceptance
REPO = Path(__file__).resolve().parents[2]


def test_sd_notify_ready_watchdog_stopping_in_order(dsn: str, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    messages: list[str] = []

    def read_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())

    try:
        read_for(4)
        proc.send_signal(signal.SIGTERM)
        read_for(1.5)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()
        log.close()
    kinds = [m.splitlines()[0] for m in messages]
    assert "READY=1" in kinds and "STOPPING=1" in kinds, messages
    ready, stopping = kinds.index("READY=1"), kinds.index("STOPPING=1")
    pings = [i for i, k in enumerate(kinds) if k == "WATCHDOG=1"]
    assert len(pings) >= 3 and ready < pings[0] and pings[-1] < stopping, kinds
    assert any(m.startswith("READY=1\nSTATUS=in flight") for m in messages)


def test_watchdog_pings_only_while_the_loop_is_alive(tmp_path: Path) -> None:
    path = str(tmp_path / "wd.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    notifier = Notifier(path, watchdog_usec=200_000)
    alive = {"value": True}
    notifier.start_watchdog(lambda _age: alive["value"], lambda: "test")

    def count_pings(seconds: float) -> int:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                n += sock.recv(4096).startswith(b"WATCHDOG=1")
        return n

    try:
        assert count_pings(1.0) >= 3
        alive["value"] = False  # the main loop is stuck
        count_pings(0.25)  # a ping already in flight may still land
        assert count_pings(1.0) == 0
    finally:
        notifier.close()
        sock.close()


def test_worker_loop_liveness_follows_its_progress(start_worker: Any) -> None:
    running: RunningWorker = start_worker(poll_interval=30)
    time.sleep(1.5)  # idle, waiting for work: the loop still ticks
    assert running.worker.loop_alive(1.2)
    running.worker._progress -= 100  # what a hung loop looks like
    assert not running.worker.loop_alive(5)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_after_a_drain_have_the_right_counts(
    start_worker: Any, conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="noop", count=40, executions=4)
    enqueue(conn, tool_kind="python", tool_config={"code": "result = 1/0"}, count=3)
    running: RunningWorker = start_worker(metrics_port=0, metrics_host="127.0.0.1")
    health = running.worker.health
    assert health is not None
    wait_until(lambda: all_terminal(conn), timeout=30)
    wait_until(
        lambda: running.worker.reporter is not None and running.worker.reporter.pending() == 0
    )
    status, text = scrape(health.port)
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("noetl_pgworker_commands_claimed_total", (("tool_kind", "noop"),))] == 40
    assert samples[("noetl_pgworker_commands_claimed_total", (("tool_kind", "python"),))] == 3
    assert samples[("noetl_pgworker_commands_completed_total", (("tool_kind", "noop"),))] == 40
    assert samples[("noetl_pgworker_commands_failed_total", (("tool_kind", "python"),))] == 3
    assert (
        samples[("noetl_pgworker_command_duration_seconds_count", (("tool_kind", "noop"),))] == 40
    )
    assert samples[("noetl_pgworker_in_flight", ())] == 0
    assert samples[("noetl_pgworker_free_slots", ())] == 8
    assert ("noetl_pgworker_claim_batch_size_count", ()) in samples
    assert samples[("noetl_pgworker_stuck_claims", ())] == 0
    assert samples[("noetl_pgworker_heartbeat_age_seconds", ())] < 5
    # claimed - created of every claim, by kind
    wait = ("noetl_pgworker_queue_wait_seconds_count", (("tool_kind", "noop"),))
    assert samples[wait] == 40
    assert samples[("noetl_pgworker_listener_reconnects_total", ())] == 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert any(name == "noetl_pgworker_build_info" for name, _ in samples)
    assert scrape(health.port, "/healthz") == (200, "ok\n")
    assert scrape(health.port, "/readyz") == (200, "ready\n")
    running.stop()


def test_json_logs_parse_and_carry_the_ids(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        execution_id, command_id = insert_raw_command(
            conn, tool_kind="noop", context="[1]", step="broken"
        )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "noetl_pgworker",
            "start",
            "--dsn",
            dsn,
            "--drain",
            "--log-format",
            "json",
            "--worker-id",
            "json-logs",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert all({"ts", "level", "logger", "message", "worker_id"} <= set(x) for x in lines)
    (bad,) = [x for x in lines if x.get("action") == "malformed"]
    assert bad["command_id"] == str(command_id) and bad["execution_id"] == str(execution_id)
    assert bad["step"] == "broken" and bad["level"] == "warning"
    assert "password" not in r.stderr


UNITS = ("noetl-pgworker.service", "noetl-pgworker@.service")


def systemd_analyze() -> str | None:
    """systemd-analyze, or None (skip) on a machine without it; required under CI."""
    found = shutil.which("systemd-analyze")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    return found


def installed_unit(name: str, tmp_path: Path) -> Path:
    """The unit as systemd-analyze can load it here: a real executable, no environment file,
    a template instantiated."""
    unit = (REPO / "deploy/systemd" / name).read_text()
    unit = unit.replace(
        "/opt/noetl-pgworker/bin/noetl-pgworker", shutil.which("true") or "/bin/true"
    )
    unit = "\n".join(x for x in unit.splitlines() if not x.startswith("EnvironmentFile="))
    path = tmp_path / name.replace("@.", "@1.")
    path.write_text(unit + "\n")
    return path


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_is_accepted_by_systemd_analyze(name: str, tmp_path: Path) -> None:
    unit = (REPO / "deploy/systemd" / name).read_text()
    for needed in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "TimeoutStopSec=",
        "KillMode=mixed",  # SIGTERM to the worker only: it stops its commands itself
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "User=",
        "--run-as",
        "StateDirectory=",  # the spool of unwritten outcomes
    ):
        assert needed in unit
    analyze = systemd_analyze()
    if analyze is None:
        unavailable(
            "no systemd-analyze (apt-get install systemd): only the directives were checked"
        )
    path = installed_unit(name, tmp_path)
    r = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "noetl-pgworker" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_exposure_is_ok(name: str, tmp_path: Path) -> None:
    """`systemd-analyze security` rates the unit 2.0 or less ("OK")."""
    analyze = systemd_analyze()
    if analyze is None:
        unavailable("no systemd-analyze (apt-get install systemd)")
    path = installed_unit(name, tmp_path)
    r = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    last = (r.stdout.strip().splitlines() or [""])[-1]
    assert "Overall exposure level" in last, r.stdout + r.stderr
    exposure = float(last.split(":")[1].split()[0])
    assert exposure <= 2.0, r.stdout


def test_the_worker_runs_as_the_least_privilege_role(dsn: str) -> None:
    login = f"pgw_login_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        schema.apply(admin, with_role=True)
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE noetl_pgworker").format(sql.Identifier(login))
        )
        enqueue(admin, tool_kind="noop", count=20)
        enqueue(admin, tool_kind="python", tool_config={"code": "result = 2"}, count=2)
    try:
        worker_dsn = psycopg.conninfo.make_conninfo(dsn, user=login)
        r = subprocess.run(
            [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", worker_dsn, "--drain"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        with psycopg.connect(dsn) as admin:
            assert count_status(admin, "COMPLETED") == 22
        with (
            psycopg.connect(worker_dsn) as limited,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            limited.execute("DELETE FROM noetl.command")
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(login)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))


# -- stopping the way systemd does --------------------------------------------------------------

IS_ROOT = os.geteuid() == 0
SLEEPY_PYTHON = "import time\ndef main():\n    time.sleep(5)\n    return {'slept': 5}\n"


def process_tree(root: int) -> list[int]:
    """``root`` and every process descending from it (what a service's control group holds)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            parents[int(name)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += children
        frontier = children
    return tree


def start_cli_worker(dsn: str, log: Any, *extra: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn, "--concurrency", "4"]
    args += ["--poll-interval", "0.2", "--tool-kinds", "python,shell", "--python-mode", "process"]
    args += ["--worker-id", "stop-test", *extra]
    if IS_ROOT:  # as the unit runs it: commands as another user
        args += ["--run-as", "nobody"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)


def test_sigterm_to_every_process_of_the_service_fails_no_command(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """systemd's default stop (KillMode=control-group) sends SIGTERM to every process of the
    service at once: the worker, its fork server and each command's process. The commands
    running then end COMPLETED or go back to PENDING, never FAILED, and a next start runs
    what went back."""
    python = enqueue(conn, tool_kind="python", step="sleepy", tool_config={"code": SLEEPY_PYTHON})
    shell = enqueue(conn, tool_kind="shell", step="nap", tool_config={"command": "sleep 5"})
    ids = [*python.command_ids, *shell.command_ids]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = start_cli_worker(dsn, log)
        try:
            wait_until(lambda: count_status(conn, "RUNNING") == 2, timeout=60)
            tree = process_tree(proc.pid)
            # the worker, its fork server and (at least) the two commands' processes
            assert len(tree) >= 4, tree
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    rows = dict(
        conn.execute(
            "SELECT command_id, status FROM noetl.command WHERE command_id = ANY(%s)", (ids,)
        ).fetchall()
    )
    assert set(rows.values()) <= {"COMPLETED", "PENDING"}, (rows, log_path.read_text())
    # python ignores the signal and finishes; the shell's sleep dies of it and goes back
    assert rows[python.command_ids[0]] == "COMPLETED", rows
    assert rows[shell.command_ids[0]] == "PENDING", rows
    failed = conn.execute(
        "SELECT count(*) FROM noetl.event WHERE event_type = 'command.failed'"
    ).fetchone()
    assert failed == (0,)
    # What went back runs at the next start, and everything ends COMPLETED.
    with (tmp_path / "again.log").open("wb") as log:
        again = start_cli_worker(dsn, log, "--drain")
        assert again.wait(90) == 0, (tmp_path / "again.log").read_text()
    assert count_status(conn, "COMPLETED") == 2


CAPS_PROBE = """
import os
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
              if line.startswith("Cap"))
try:
    os.setuid(worker_uid)
    became = "worker"
except PermissionError:
    became = "PermissionError"
result = {"uid": os.getuid(), "caps": {k: v.strip() for k, v in status.items()}, "setuid": became}
"""


def interpreter_for_another_user(request: pytest.FixtureRequest) -> str:
    """A python another user may run, with this checkout and its dependencies: this one, or
    (when it lives in a home others cannot enter) a virtual environment of the system's python
    of the same version whose site-packages point at the checkout and at this environment's
    packages (a ``.pth`` file: read even under ``python -I``, as the fork servers run)."""
    import sysconfig

    real = os.path.realpath(sys.executable)
    if not real.startswith("/root/"):
        return sys.executable
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    system = shutil.which(f"python{version}", path="/usr/bin")
    if system is None:
        unavailable(f"{real} is not executable by another user and no system python matches")
    # (not under tmp_path: pytest's base directory is the current user's alone)
    venv = Path(tempfile.mkdtemp(prefix="pgw-venv-"))
    request.addfinalizer(lambda: shutil.rmtree(venv, ignore_errors=True))
    venv.chmod(0o755)
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = venv / "lib" / f"python{version}" / "site-packages"
    (site / "checkout.pth").write_text(f"{REPO}\n{sysconfig.get_paths()['purelib']}\n")
    return str(venv / "bin" / "python")


def test_a_worker_with_the_units_capabilities_gives_none_to_its_commands(
    dsn: str, conn: psycopg.Connection[Any], request: pytest.FixtureRequest
) -> None:
    """The unit runs the worker as its own user with CAP_SETUID, CAP_SETGID and CAP_KILL
    (ambient), in the run-as user's group: the worker starts python and shell commands as the
    run-as user, and they hold no capability (cannot switch back to the worker's user)."""
    setpriv = shutil.which("setpriv")
    if not IS_ROOT or setpriv is None:
        unavailable("needs root and setpriv (util-linux) to start a worker as the unit does")
    import pwd

    worker, run_as = pwd.getpwnam("daemon"), pwd.getpwnam("nobody")
    python = interpreter_for_another_user(request)
    caps = "+setuid,+setgid,+kill"
    probe = {"code": CAPS_PROBE}
    enqueue(conn, tool_kind="python", step="probe", tool_config=probe, args={"worker_uid": 1})
    conn.execute(
        "UPDATE noetl.command SET context = jsonb_set(context, '{input,worker_uid}', %s::jsonb)",
        (str(worker.pw_uid),),
    )
    shell = {"command": "grep ^Cap /proc/self/status; id -u"}
    enqueue(conn, tool_kind="shell", step="shell-probe", tool_config=shell)
    args = [
        setpriv,
        f"--reuid={worker.pw_uid}",
        f"--regid={worker.pw_gid}",
        f"--groups={run_as.pw_gid}",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set=-all,{caps}",
        "--no-new-privs",
        python,
        "-m",
        "noetl_pgworker",
        "start",
        "--dsn",
        dsn,
        "--drain",
        "--tool-kinds",
        "python,shell",
        "--python-mode",
        "process",
        "--run-as",
        "nobody",
        "--worker-id",
        "caps",
    ]
    r = subprocess.run(args, cwd="/", capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    rows = dict(conn.execute("SELECT step_name, result FROM noetl.command").fetchall())
    python = rows["probe"]["context"]
    assert python["uid"] == run_as.pw_uid, rows
    assert python["setuid"] == "PermissionError"
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(python["caps"][key], 16) == 0, python["caps"]
    out = rows["shell-probe"]["context"]["stdout"]
    assert "CapEff:\t0000000000000000" in out and "CapAmb:\t0000000000000000" in out, out
    assert out.strip().splitlines()[-1] == str(run_as.pw_uid)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_one_worker_of_the_fleet_exports_the_queue_depth_zeros_included(
    start_worker: Any, conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, tool_kind="python", tool_config={"code": "result = 1"}, count=3)
    common = {"metrics_port": 0, "metrics_host": "127.0.0.1", "tool_kinds": ("noop",)}
    first: RunningWorker = start_worker(worker_id="a", **common)
    second: RunningWorker = start_worker(worker_id="b", **common)
    assert first.worker.health is not None and second.worker.health is not None

    def depth(running: RunningWorker) -> dict[tuple[str, str], float]:
        assert running.worker.health is not None
        _, text = scrape(running.worker.health.port)
        return {
            (dict(labels)["status"], dict(labels)["tool_kind"]): value
            for (name, labels), value in metric_samples(text).items()
            if name == "noetl_pgworker_queue_depth"
        }

    wait_until(lambda: bool(depth(first)), timeout=30)
    leader = depth(first)
    assert leader[("PENDING", "python")] == 3  # a kind no worker runs, still counted
    assert leader[("PENDING", "noop")] == 0 and leader[("RUNNING", "noop")] == 0  # at 0
    assert depth(second) == {}  # the other worker exports nothing for it
