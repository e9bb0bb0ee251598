"""The fork server: one single-threaded helper process that starts every ``python`` and
``shell`` command of a worker. Standard library only; run as a script (``python -I
forkserver.py``) by :class:`noetl_pgworker.tools.process.Sandbox`, never forked from the
(multi-threaded) worker.

At start it reads its configuration (one JSON line) on stdin: ``socket`` (path to listen on),
``limits`` (the operator's ceilings: ``memory_mb``, ``max_procs``, ``max_file_mb``,
``cpu_seconds``), ``run_as`` (``[uid, gid]`` or null), ``preload`` (modules to import once) and
``runner`` (the path of ``pyrunner.py``). It makes itself undumpable (its memory and
``/proc/<pid>/environ`` unreadable to same-user processes) and a child subreaper, sets the
ceilings as its own hard limits (address space, processes, file size) so that nothing it
starts can have more, imports the runner and the preloaded modules, answers ``ready`` on
stdout and serves. EOF on stdin (the worker is gone) stops it, and everything it started.

Per connection it forks a **supervisor**, which reads the request (a length-prefixed JSON
frame: ``kind`` ``python`` with ``spec`` and ``result_path``, or ``exec`` with ``argv``,
``env``; plus ``workdir``, ``cwd``, ``stdin_path``, ``limits``), forks the command's process
in a session of its own (limits lowered to what the command asks, never raised; the
``run_as`` user; stdout/stderr to files in ``workdir``), answers ``{"pid"}``, and waits for it
or for ``{"kill": true}`` / EOF from the worker. Either way it then kills every process the
command left (it is their subreaper: background and ``setsid`` descendants are reparented to
it) and answers ``{"status"}`` (a wait status) or ``{"error"}``. Nothing is shared between
commands: each runs in a fresh fork of a process that ran no command.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

LIMITS = {
    "memory_mb": (resource.RLIMIT_AS, 1024 * 1024),
    "max_procs": (resource.RLIMIT_NPROC, 1),
    "max_file_mb": (resource.RLIMIT_FSIZE, 1024 * 1024),
    "cpu_seconds": (resource.RLIMIT_CPU, 1),
}


def prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


# -- framing ----------------------------------------------------------------------------------


def send_frame(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def recv_frame(sock: socket.socket) -> Any:
    """The next frame, or None at EOF."""
    head = recv_exact(sock, 4)
    if head is None:
        return None
    (length,) = struct.unpack("!I", head)
    body = recv_exact(sock, length)
    return None if body is None else json.loads(body)


# -- limits -----------------------------------------------------------------------------------


def set_limits(limits: dict[str, Any]) -> None:
    """Set each given limit (soft and hard) to ``value``, never above the current hard limit."""
    for key, value in limits.items():
        if key not in LIMITS or value is None:
            continue
        which, unit = LIMITS[key]
        wanted = int(value) * unit
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            wanted = min(wanted, hard)
        resource.setrlimit(which, (wanted, wanted))


# -- the command's process --------------------------------------------------------------------


def close_fds(keep: tuple[int, ...]) -> None:
    """Close every open descriptor but ``keep`` (listing them: closing 65,536 numbers one by
    one costs milliseconds where close_range(2) is not used)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _child(req: dict[str, Any], config: dict[str, Any], runner: Any, err_w: int, go_r: int) -> None:
    """In the forked command process: never returns."""
    code = 127
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        workdir = req["workdir"]
        stdin = os.open(req.get("stdin_path") or os.devnull, os.O_RDONLY)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out = os.open(os.path.join(workdir, "stdout"), flags, 0o600)
        err = os.open(os.path.join(workdir, "stderr"), flags, 0o600)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        close_fds(keep=(0, 1, 2, err_w, go_r))
        set_limits(req.get("limits") or {})
        run_as = config.get("run_as")
        if run_as:
            uid, gid = int(run_as[0]), int(run_as[1])
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        os.chdir(req.get("cwd") or workdir)
        env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
        # Nothing of the command runs before the worker knows its pid (so that a command
        # that kills the fork server is never mistaken for one that did not start).
        if os.read(go_r, 1) != b"g":
            os._exit(code)
        os.close(go_r)
        if req["kind"] == "exec":
            argv = [str(a) for a in req["argv"]]
            os.set_inheritable(err_w, False)
            os.execvpe(argv[0], argv, env)
        os.environ.clear()
        os.environ.update(env)
        os.close(err_w)
        err_w = -1
        code = runner.run_to_file(req["spec"], req["result_path"])
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    except BaseException as exc:
        if err_w >= 0:
            what = req.get("argv", ["python"])[0] if isinstance(req, dict) else "?"
            message = f"cannot run {what!r}: {getattr(exc, 'strerror', None) or exc}"
            with contextlib.suppress(OSError):
                os.write(err_w, message.encode()[:4000])
    os._exit(code)


def recv_frame_quiet(conn: socket.socket) -> Any:
    try:
        return recv_frame(conn)
    except (OSError, ValueError):
        return None


# -- the server -------------------------------------------------------------------------------


def _load_runner(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("noetl_pgworker_pyrunner", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the python runner from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    """The fork server's loop. Every command's process is its direct child, the leader of a
    session of its own; the server is a child subreaper, so whatever a command leaves
    behind (a background job, a ``setsid`` daemon, a double fork) becomes its child when
    its parent dies, and is killed: a process of an ended command's session, or one that
    left its command's session and lost its parent, at once; the rest of a command's
    session when the command ends."""

    def __init__(self, config: dict[str, Any], runner: Any) -> None:
        self.config = config
        self.runner = runner
        #: command process pid -> the worker's connection for it
        self.commands: dict[int, socket.socket] = {}
        self.me = os.getpid()

    # -- the tree --------------------------------------------------------------------------

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.me}/task/{self.me}/children", "rb") as fh:
                return [int(p) for p in fh.read().split()]
        except OSError:
            return [pid for pid, ppid in _ppids() if ppid == self.me]

    def sweep(self) -> bool:
        """SIGKILL every child that is not a running command's process and does not belong
        to a running command's session; reap what ended. True if such a child is left."""
        left = False
        for pid in self.children():
            if pid in self.commands:
                continue
            try:
                sid = os.getsid(pid)
            except OSError:
                sid = -1
            if sid in self.commands:
                continue  # a running command's own process, orphaned inside its session
            left = True
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.reap_strays()
        return left

    def reap_strays(self) -> None:
        """Reap ended children that are not command processes (those are reaped by
        :meth:`finish`, after their session is killed)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            if info.si_pid in self.commands:
                self.finish(info.si_pid, killed=False)
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.si_pid, 0)

    def finish(self, pid: int, *, killed: bool) -> None:
        """The command's process ended (or is to be killed): kill its session, reap it, kill
        whatever it left, answer the worker."""
        conn = self.commands.pop(pid)
        # The process is still a zombie (or alive): its group id cannot have been reused.
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        self.kill_session(pid)
        with contextlib.suppress(OSError):
            send_frame(conn, {"status": status, "killed": killed})
        conn.close()

    def kill_session(self, sid: int, limit: float = 10.0) -> None:
        """Kill what is left of an ended command, until none of it is left."""
        deadline = time.monotonic() + limit
        for pid, _ppid in _ppids() if self._has_session(sid) else ():
            with contextlib.suppress(OSError):
                if os.getsid(pid) == sid:
                    os.kill(pid, signal.SIGKILL)
        while self.sweep() and time.monotonic() < deadline:
            time.sleep(0.001)

    @staticmethod
    def _has_session(sid: int) -> bool:
        # Anything still in the session? (a process that left its group but not the session)
        try:
            os.killpg(sid, 0)
            return True
        except OSError:
            pass
        return False

    # -- commands --------------------------------------------------------------------------

    def start(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        req = recv_frame_quiet(conn)
        if not isinstance(req, dict):
            conn.close()
            return
        err_r, err_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            os.close(go_w)
            _child(req, self.config, self.runner, err_w, go_r)
        os.close(err_w)
        os.close(go_r)
        conn.settimeout(None)
        self.commands[pid] = conn
        try:
            send_frame(conn, {"pid": pid})
            sent = True
        except OSError:
            sent = False
        with contextlib.suppress(OSError):
            os.write(go_w, b"g" if sent else b"x")
        os.close(go_w)
        failure = b""
        while chunk := os.read(err_r, 4096):
            failure += chunk
        os.close(err_r)
        if failure:
            self.commands.pop(pid)
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                send_frame(conn, {"error": failure.decode("utf-8", "replace")})
            conn.close()
        elif not sent:
            self.finish(pid, killed=True)

    def message(self, pid: int) -> None:
        """The worker wrote (``{"kill": true}``) or hung up: kill the command."""
        msg = recv_frame_quiet(self.commands[pid])
        if msg is None or (isinstance(msg, dict) and msg.get("kill")):
            self.finish(pid, killed=True)

    def run(self, listener: socket.socket, wake_r: int) -> None:
        stopping: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        while not stopping:
            conns = {conn.fileno(): pid for pid, conn in self.commands.items()}
            try:
                ready, _, _ = select.select([listener.fileno(), wake_r, 0, *conns], [], [], 1.0)
            except InterruptedError:
                continue
            if 0 in ready and not os.read(0, 4096):
                break  # the worker is gone
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            for fd in ready:
                pid = conns.get(fd)
                if pid is not None and pid in self.commands:
                    self.message(pid)
            self.sweep()
            if listener.fileno() in ready:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                self.start(conn)
        for pid in list(self.commands):
            self.finish(pid, killed=True)
        self.kill_session(-1, limit=5)


def _ppids() -> list[tuple[int, int]]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        out.append((int(name), int(stat[stat.rfind(b")") + 2 :].split()[1])))
    return out


def serve(config: dict[str, Any]) -> int:
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    ceilings = dict(config.get("limits") or {})
    ceilings.pop("cpu_seconds", None)  # per process: set in each command's process
    set_limits(ceilings)
    runner = _load_runner(config["runner"])
    for name in config.get("preload") or ():
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(config["socket"])
    listener.listen(256)
    os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.close(devnull)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    gc.freeze()  # what is loaded now stays shared with the command processes
    Server(config, runner).run(listener, wake_r)
    return 0


def main() -> int:
    line = sys.stdin.buffer.readline()
    config = json.loads(line)
    try:
        return serve(config)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(1, f"error: {type(exc).__name__}: {exc}\n".encode())
        return 1


if __name__ == "__main__":
    sys.exit(main())
