"""Running a tool's child process in a sandbox: through the fork server
(:mod:`noetl_pgworker.tools.forkserver`), which the :class:`Sandbox` starts, supervises and
restarts. Each command's process runs in a session of its own under a per-command
supervisor that kills everything it left (background and ``setsid`` descendants included) at
its end or timeout; the operator's limits are the ceiling (a command may only lower them);
``run_as`` runs it as another user; its output goes to files and is kept bounded. Those files
(stdout, stderr, a python command's result) are unnamed (``O_TMPFILE`` in the temporary
directory; memory files where that is not supported), opened by the worker and handed to
the fork server with the request: nothing to name, open again, or remove. The output files
are used again by later commands (emptied first), but only after a command whose every process
the fork server reported dead: making a new file per command cost the worker more than the rest
of the command (the file system's inode allocation).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import interrupt
from ..errors import ConfigError, ToolError
from . import forkserver

logger = logging.getLogger(__name__)

#: Environment variables a child inherits from the worker; nothing else (the worker's
#: environment may hold the database password).
ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")

FORKSERVER = Path(forkserver.__file__)
RUNNER = Path(__file__).with_name("pyrunner.py")
#: What the fork server imports by default: what the runner needs.
DEFAULT_PRELOAD = ("json", "inspect", "traceback")
PR_SET_DUMPABLE = 4
#: Output files kept for reuse, at most (two per command running at once).
MAX_SPARE_OUTPUTS = 256


def _socket_dir() -> str:
    """A private directory for the fork server's socket, in the temporary directory; without
    a writable one the worker cannot run python or shell commands, so it says so at once."""
    try:
        return tempfile.mkdtemp(prefix="noetl-pgworker-fs-")
    except OSError as exc:
        raise ConfigError(
            f"no writable temporary directory for the fork server ({exc.strerror or exc});"
            " give the worker one: a writable $TMPDIR or /tmp (in a container with a read-only"
            " root, a tmpfs or an emptyDir volume on /tmp)"
        ) from exc


def harden_process() -> bool:
    """Make this (the worker's) process undumpable: same-user processes that are not
    ptrace-capable cannot read its memory, ``/proc/<pid>/environ`` or attach to it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of a command's process; ``None`` = not limited."""

    memory_mb: int | None = 2048
    max_procs: int | None = 256
    max_file_mb: int | None = 1024
    cpu_seconds: int | None = 3600

    def lowered_by(self, config: Mapping[str, Any], tool: str) -> Limits:
        """These limits, lowered where ``config`` asks for less (asking for more changes
        nothing: the operator's limits are the ceiling)."""
        changes: dict[str, int] = {}
        for key in ("memory_mb", "max_procs", "max_file_mb", "cpu_seconds"):
            value = config.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ToolError(f"{tool}: tool_config.{key} must be a positive integer")
            ceiling = getattr(self, key)
            changes[key] = value if ceiling is None else min(value, ceiling)
        return replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, int | None]:
        return {
            "memory_mb": self.memory_mb,
            "max_procs": self.max_procs,
            "max_file_mb": self.max_file_mb,
            "cpu_seconds": self.cpu_seconds,
        }


@dataclass(frozen=True, slots=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    workdir: Path | None


class TimedOut(Exception):
    pass


class SandboxError(ToolError):
    """The sandbox could not run the command (fork server gone, supervisor killed)."""

    error_type = "sandbox"


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
    env.update(extra or {})
    return env


#: CAP_KILL, CAP_SETGID, CAP_SETUID: what a worker that is not root needs for --run-as.
RUN_AS_CAPABILITIES = (5, 6, 7)


def holds_capabilities(caps: Sequence[int]) -> bool:
    """Does this process hold every capability of ``caps`` (numbers) in its effective set?"""
    try:
        with open("/proc/self/status", "rb") as fh:
            held = next(int(x.split()[1], 16) for x in fh if x.startswith(b"CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return all(held >> cap & 1 for cap in caps)


def resolve_user(user: str) -> tuple[int, int, str]:
    """(uid, gid, home) of ``user`` (a name or a numeric id)."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise ConfigError(f"--run-as: no such user {user!r}") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_dir


class _Server:
    def __init__(self, proc: subprocess.Popen[bytes], path: str, generation: int) -> None:
        self.proc = proc
        self.path = path
        self.generation = generation
        self.stop: Callable[[], Any] = lambda: None

    def alive(self) -> bool:
        return self.proc.poll() is None


class Sandbox:
    """The fork server of a worker, started on first use (or :meth:`start`), restarted when
    it dies, stopped by :meth:`close`. Thread-safe: one connection per command."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        run_as: str | None = None,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        start_timeout: float = 30.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        #: Set in the environment of the fork server and of what it starts.
        self.extra_env = dict(extra_env or {})
        self.preload = tuple(preload)
        self.start_timeout = start_timeout
        self.user: tuple[int, int, str] | None = None
        if run_as:
            if os.geteuid() != 0 and not holds_capabilities(RUN_AS_CAPABILITIES):
                raise ConfigError(
                    f"--run-as {run_as}: to start commands as another user the worker must run"
                    " as root, or hold CAP_SETUID, CAP_SETGID and CAP_KILL (as the systemd unit"
                    f" gives them; it runs as uid {os.geteuid()} without them); drop --run-as"
                    " or start the worker so"
                )
            self.user = resolve_user(run_as)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._generation = 0
        self._dir: str | None = None
        self._scratch: str | None = None
        self._closed = False
        self.restarts = 0
        #: Output files ready for the next command (empty, offset 0).
        self._spare_outputs: list[int] = []

    # -- the fork server's life -------------------------------------------------------------

    def start(self) -> None:
        self._ensure()

    @property
    def pid(self) -> int | None:
        server = self._server
        return server.proc.pid if server is not None and server.alive() else None

    def _ensure(self, dead: int | None = None) -> _Server:
        """The running fork server; a new one if there is none or generation ``dead`` died."""
        with self._lock:
            if self._closed:
                raise SandboxError("the worker is stopping: no new processes")
            server = self._server
            if server is not None and server.alive() and server.generation != dead:
                return server
            if server is not None:
                if server.generation == dead or not server.alive():
                    server.stop()
                    self.restarts += 1
                    logger.warning(
                        "the fork server (pid %d) died (%s); starting a new one",
                        server.proc.pid,
                        _exit_text(server.proc.returncode),
                        extra={"action": "forkserver_restart"},
                    )
                else:
                    return server
            server = self._server = self._spawn()
            # Stopped by close(), or when this sandbox is dropped or the interpreter exits.
            server.stop = weakref.finalize(self, Sandbox._stop, server)
            return server

    def _spawn(self) -> _Server:
        if self._dir is None:
            self._dir = _socket_dir()
            weakref.finalize(self, _rmdir, self._dir)
        self._generation += 1
        path = os.path.join(self._dir, f"fs-{self._generation}.sock")
        config = {
            "socket": path,
            "limits": self.limits.as_dict(),
            "run_as": [self.user[0], self.user[1]] if self.user else None,
            "preload": list(self.preload),
            "runner": str(RUNNER),
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", str(FORKSERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env(),  # what its commands get: python commands keep it as it is
            cwd="/",
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], self.start_timeout)
        line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        if line != "ready":
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()
            why = line.removeprefix("error: ") or "no answer"
            raise ConfigError(f"cannot start the fork server: {why}")
        return _Server(proc, path, self._generation)

    @staticmethod
    def _stop(server: _Server) -> None:
        proc = server.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: the fork server stops and kills what it started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(OSError):
            os.unlink(server.path)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            server.stop()
        if self._dir is not None:
            _rmdir(self._dir)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        with self._lock:
            spare, self._spare_outputs = self._spare_outputs, []
        for fd in spare:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- running a command ------------------------------------------------------------------

    @contextlib.contextmanager
    def workdir(self, prefix: str) -> Iterator[str]:
        """A directory for one command (its working directory). With ``run_as`` it stays the
        worker's, shared with the user's group (so the worker needs no CAP_DAC_OVERRIDE to
        read and remove it). Removed at the end: usually empty (the output files have no
        name), so one rmdir(2)."""
        path = tempfile.mkdtemp(prefix=prefix)
        try:
            self._share(path)
            yield path
        finally:
            try:
                os.rmdir(path)
            except OSError:
                shutil.rmtree(path, ignore_errors=True)

    def scratch_dir(self) -> str:
        """The working directory of commands that get none of their own (process-mode python):
        one per sandbox, made once and removed with it — a command can write relative files,
        never in ``/``. Shared by those commands (a directory per command cost more than the
        rest of the command on a disk shared with PostgreSQL); shared with ``run_as``'s group
        when set."""
        with self._lock:
            if self._scratch is None:
                path = tempfile.mkdtemp(prefix="noetl-pgworker-scratch-")
                self._share(path)
                self._scratch = path
                weakref.finalize(self, shutil.rmtree, path, True)
            return self._scratch

    def _share(self, path: str) -> None:
        """Give the ``run_as`` user's group the directory ``path`` (the worker keeps it: it
        needs no CAP_DAC_OVERRIDE to read and remove it, and no CAP_CHOWN when it is a member
        of that group)."""
        if self.user is None:
            return
        try:
            os.chown(path, os.geteuid(), self.user[1])
        except PermissionError:
            raise SandboxError(
                f"cannot share a command's directory with group {self.user[1]} of the run-as"
                " user: the worker must be a member of that group (systemd:"
                " SupplementaryGroups=) or hold CAP_CHOWN"
            ) from None
        os.chmod(path, 0o770)

    @staticmethod
    def result_file() -> int:
        """An open, unnamed file in memory for a python command's result (read whole by the
        worker anyway; no disk, no journal)."""
        try:
            return os.memfd_create("noetl-pgworker-result", os.MFD_CLOEXEC)
        except (OSError, AttributeError):
            return Sandbox.output_file()

    @staticmethod
    def output_file() -> int:
        """An open, unnamed file for a command's output (read and write, appending;
        close-on-exec)."""
        try:
            flags = os.O_TMPFILE | os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
            return os.open(tempfile.gettempdir(), flags, 0o600)
        except (OSError, AttributeError):
            fd = os.memfd_create("noetl-pgworker-output", os.MFD_CLOEXEC)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            return fd

    def shared_file(self, path: Path) -> None:
        """Create ``path`` empty, writable by the ``run_as`` user's group, readable by us."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if self.user is not None:
                os.fchown(fd, os.geteuid(), self.user[1])
                os.fchmod(fd, 0o660)
        finally:
            os.close(fd)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = base_env(self.extra_env)
        if self.user is not None:
            env["HOME"] = self.user[2]
        env.update(extra or {})
        return env

    def run(
        self,
        request: dict[str, Any],
        *,
        timeout: float,
        workdir: Path | None,
        limits: Limits | None = None,
        output_limit: int = 256 * 1024,
        tool: str = "process",
        result_fd: int | None = None,
    ) -> Finished:
        """Run one command's process; raise :class:`TimedOut` (after killing all it started)
        at ``timeout``, :class:`SandboxError` if the sandbox failed it, ``OSError``-like
        :class:`ToolError` if it could not start. ``workdir`` is its working directory
        (``None``: ``/``, unless the request says ``cwd``); ``result_fd`` (an open file, for a
        ``python`` request) is where it writes its result."""
        deadline = _Deadline(timeout)
        request = {
            **request,
            "workdir": str(workdir) if workdir is not None else self.scratch_dir(),
            "limits": (limits or self.limits).as_dict(),
        }
        outputs = [self._take_output(), self._take_output()]
        reusable = False
        sizes: list[int | None] = [None, None]  # known once the command's processes are dead
        try:
            files = [*outputs, *([result_fd] if result_fd is not None else [])]
            sock, pid = self._start_command(request, files, deadline, tool)
            with sock:
                status = self._wait(sock, pid, deadline, tool)
            # The fork server answered a status: every process of the command is dead, none
            # can write to these files any more.
            reusable = True
            signalled = os.WIFSIGNALED(status)
            returncode = -os.WTERMSIG(status) if signalled else os.WEXITSTATUS(status)
            sizes = [os.fstat(fd).st_size for fd in outputs]
            if interrupt.stopped_from_outside(returncode, interrupt.current()):
                raise interrupt.Interrupted(
                    f"{tool}: the worker was stopped; the command's process got"
                    f" {signal_name(returncode)}"
                )
            return Finished(
                returncode=returncode,
                stdout=bounded_fd(outputs[0], output_limit, sizes[0]),
                stderr=bounded_fd(outputs[1], output_limit, sizes[1]),
                workdir=workdir,
            )
        finally:
            for fd, size in zip(outputs, sizes, strict=True):
                if not (reusable and self._give_back_output(fd, size)):
                    os.close(fd)

    def _take_output(self) -> int:
        with self._lock:
            if self._spare_outputs:
                return self._spare_outputs.pop()
        return self.output_file()

    def _give_back_output(self, fd: int, size: int | None = None) -> bool:
        """Empty ``fd`` (``size``: its size, if known) and keep it for the next command; False
        if it cannot be kept. (Output files are opened to append: emptied, the next command
        writes from the start again, with no seek.)"""
        try:
            if size is None:
                size = os.fstat(fd).st_size
            if size:
                os.ftruncate(fd, 0)
        except OSError:
            return False
        with self._lock:
            if self._closed or len(self._spare_outputs) >= MAX_SPARE_OUTPUTS:
                return False
            self._spare_outputs.append(fd)
        return True

    def _start_command(
        self, request: dict[str, Any], files: list[int], deadline: _Deadline, tool: str
    ) -> tuple[socket.socket, int]:
        """Hand the request to the fork server; (connection, pid). A fork server that died
        before the command started is restarted and the command tried once more."""
        failed: int | None = None
        for attempt in (1, 2):
            server = self._ensure(dead=failed)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(1.0, min(30.0, deadline.left())))
                sock.connect(server.path)
                forkserver.send_frame_fds(sock, request, files)
                reply = forkserver.recv_frame(sock)
            except OSError:
                reply = None
            if isinstance(reply, dict) and "pid" in reply:
                sock.settimeout(None)
                return sock, int(reply["pid"])
            sock.close()
            if isinstance(reply, dict) and "error" in reply:
                raise ToolError(f"{tool}: {reply['error']}")
            failed = server.generation
            if attempt == 2 or deadline.left() <= 0.001:
                break
        raise SandboxError(
            f"{tool}: the fork server died before the command started, twice (it was"
            " restarted each time)"
        )

    def _wait(self, sock: socket.socket, pid: int, deadline: _Deadline, tool: str) -> int:
        stop = _await_reply(sock, deadline, interrupt.current())
        if stop is not None:  # out of time, cancelled, or the worker's stop ran out of time
            try:
                forkserver.send_frame(sock, {"kill": True})
                sock.settimeout(15)
                forkserver.recv_frame(sock)  # everything it started is dead now
            except (OSError, ValueError):
                _kill_group(pid)
            raise stop
        try:
            reply = forkserver.recv_frame(sock)
        except (OSError, ValueError):
            reply = None
        if isinstance(reply, dict) and "error" in reply:
            raise ToolError(f"{tool}: {reply['error']}")
        if not isinstance(reply, dict) or reply.get("status") is None:
            _kill_group(pid)
            raise SandboxError(
                f"{tool}: the fork server was killed while the command ran (the command's"
                " process group was killed)"
            )
        return int(reply["status"])


def _await_reply(
    sock: socket.socket, deadline: _Deadline, handle: interrupt.Running | None
) -> Exception | None:
    """Wait for the fork server's answer: None once it is there, else why to stop waiting
    (:class:`TimedOut`, or the command's handle's reason, looked at every
    :data:`interrupt.WATCH_INTERVAL`)."""
    while True:
        left = max(0.0, deadline.left())
        step = left if handle is None else min(left, interrupt.WATCH_INTERVAL)
        ready, _, _ = select.select([sock], [], [], step)
        if ready:
            return None
        why = handle.reason() if handle is not None else None
        if why is not None:
            return why
        if deadline.left() <= 0:
            return TimedOut()


class _Deadline:
    def __init__(self, seconds: float) -> None:
        import time

        self._clock = time.monotonic
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.at - self._clock())


def _rmdir(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        return f"killed by {signal_name(returncode)}"
    return f"exit code {returncode}"


def bounded_fd(fd: int, limit: int, size: int | None = None) -> str:
    """The first ``limit`` bytes of the open file ``fd`` (of ``size`` bytes, if known) as
    text, and how many were left."""
    if size is None:
        size = os.fstat(fd).st_size
    data = os.pread(fd, limit, 0) if size else b""
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text += f"\n… [{size - limit} more bytes not kept]"
    return text


def read_fd(fd: int) -> bytes:
    """All of the open file ``fd``, from its start (a file no process writes to any more: read
    to its size, or further if it grew)."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 65536), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
        if offset == size and len(chunks) == 1:
            return chunk


def bounded(path: Path, limit: int) -> str:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ""
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
