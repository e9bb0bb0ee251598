"""Running a child process for a tool: own process group, killed whole at the timeout, output
captured to files and kept bounded (a chatty command cannot exhaust the worker's memory)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Environment variables a child inherits from the worker; nothing else (the worker's
#: environment may hold the database password).
ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")


@dataclass(frozen=True, slots=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    workdir: Path


class TimedOut(Exception):
    pass


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
    env.update(extra or {})
    return env


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    workdir: Path,
    stdin: bytes | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    output_limit: int = 256 * 1024,
) -> Finished:
    """Run ``argv``; raise :class:`TimedOut` (after killing its process group) at ``timeout``."""
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd or str(workdir),
            env=dict(env) if env is not None else base_env(),
            start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise TimedOut from None
        finally:
            if proc.poll() is None:
                kill_group(proc)
    return Finished(
        returncode=proc.returncode,
        stdout=bounded(out_path, output_limit),
        stderr=bounded(err_path, output_limit),
        workdir=workdir,
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait(timeout=10)


def bounded(path: Path, limit: int) -> str:
    size = path.stat().st_size
    with path.open("rb") as fh:
        data = fh.read(limit)
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text += f"\n… [{size - limit} more bytes not kept]"
    return text


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return str(-returncode)


def workdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)
