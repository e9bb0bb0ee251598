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

Per connection it reads the request (a length-prefixed JSON frame: ``kind`` ``python`` with
``spec``, or ``exec`` with ``argv``; plus ``env``, ``workdir``, ``cwd``, ``stdin_path``,
``limits``; sent with the command's open stdout and stderr files and, for ``python``, its
result file, as SCM_RIGHTS descriptors), forks the command's process in a session of its own
(limits lowered to what the command asks, never raised; the ``run_as`` user; stdout/stderr to
the files it was given), answers ``{"pid"}``, and waits for it or for ``{"kill": true}`` / EOF
from the worker. Either way it then kills every process the command left (it is their
subreaper: background and ``setsid`` descendants are reparented to it) and answers
``{"status"}`` (a wait status) or ``{"error"}``. Nothing is shared between commands: each runs
in a fresh fork of a process that ran no command. The server never waits for a command's
process to get ready: a failure to start it comes back on a pipe the loop watches.

A ``python`` request's code is compiled by the server before the fork (compiling is most of a
small step's cost in a fresh fork: every page the compiler writes is copied), and the code
object is kept for the next request with the same step name and source (a loop's iterations):
compiling runs nothing of the code, and a code object is immutable, so nothing of one command
reaches another. Code too large to compile quickly, or that does not compile, is left to the
command's process, which reports the error as before.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import array
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


def send_raw(sock: socket.socket, data: bytes) -> None:
    """Send ``data``, a JSON text, as a frame (the server's replies: no encoder to run)."""
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
    """Close every open descriptor above 2 but ``keep``: os.closerange, which is one
    close_range(2) per gap where the kernel has it."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20  # (one call with close_range(2); a loop only on old kernels)
    top = max(soft, 1024, max(keep) + 1)
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, top)


# One frame, no helpers: in the forked process every function that runs for the first time
# writes to its code object, a page copied per command.
def _child(  # noqa: PLR0913, PLR0915 — see above
    req: dict[str, Any],
    fds: list[int],
    env: dict[str, str],
    same_env: bool,
    config: dict[str, Any],
    runner: Any,
    err_w: int,
    go_r: int,
    compiled: Any = None,
) -> None:
    """In the forked command process: never returns."""
    code = 127
    try:
        signal.set_wakeup_fd(-1)
        # SIGTERM keeps the server's no-op handler (a stop is the worker's); exec() resets it.
        _signal.signal(signal.SIGCHLD, _signal.SIG_DFL)
        os.setsid()
        workdir = req["workdir"]
        stdin = os.open(req.get("stdin_path") or os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        result = fds[2] if len(fds) > 2 else -1
        close_fds(keep=(0, 1, 2, err_w, go_r, result))
        set_limits(req.get("limits") or {})
        run_as = config.get("run_as")
        if run_as:
            uid, gid = int(run_as[0]), int(run_as[1])
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        if DROP_CAPS is not None:  # (not root: setuid kept the worker's capabilities)
            DROP_CAPS()
        os.chdir(req.get("cwd") or workdir)
        # Nothing of the command runs before the worker knows its pid (so that a command
        # that kills the fork server is never mistaken for one that did not start).
        if os.read(go_r, 1) != b"g":
            os._exit(code)
        os.close(go_r)
        if req["kind"] == "exec":
            argv = [str(a) for a in req["argv"]]
            os.set_inheritable(err_w, False)
            os.execvpe(argv[0], argv, env)
        if not same_env:  # (rewriting os.environ costs a hundred copied pages)
            os.environ.clear()
            os.environ.update(env)
        os.close(err_w)
        err_w = -1
        code = runner.run_to_fd(req["spec"], result, compiled)
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


#: Descriptors a request may carry: stdout, stderr, the result file.
MAX_FDS = 3


def send_frame_fds(sock: socket.socket, obj: Any, fds: list[int]) -> None:
    """:func:`send_frame`, with ``fds`` passed along (SCM_RIGHTS)."""
    data = json.dumps(obj).encode()
    data = struct.pack("!I", len(data)) + data
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_request(conn: socket.socket) -> tuple[Any, list[int]]:
    """A frame sent by :func:`send_frame_fds` and its descriptors (close-on-exec); (None, [])
    at EOF or on a malformed frame."""
    fds: list[int] = []
    try:
        data, ancdata, _flags, _addr = conn.recvmsg(
            65536, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        if len(data) < 4:
            more = recv_exact(conn, 4 - len(data)) if data else None
            if more is None:
                raise ValueError("no request")
            data += more
        (length,) = struct.unpack("!I", data[:4])
        body = data[4:]
        if len(body) < length:
            rest = recv_exact(conn, length - len(body))
            if rest is None:
                raise ValueError("truncated request")
            body += rest
        return json.loads(body), fds
    except (OSError, ValueError):
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None, []


# -- the server -------------------------------------------------------------------------------


def _load_runner(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("noetl_pgworker_pyrunner", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the python runner from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Source compiled by the server, at most (larger code is compiled in the command's process).
COMPILE_MAX_CHARS = 64 * 1024
#: Code objects kept for requests with the same step and source, at most.
COMPILED_KEEP = 128


class CompiledCode:
    """Code objects of recent ``python`` requests, by (step, source); least recently used
    dropped first."""

    def __init__(self, runner: Any, keep: int = COMPILED_KEEP) -> None:
        self.runner = runner
        self.keep = keep
        self.codes: dict[tuple[str, str], Any] = {}

    def get(self, spec: Any) -> Any:
        """The compiled code of ``spec``, or None (the command's process compiles it)."""
        if not isinstance(spec, dict):
            return None
        code, step = spec.get("code"), spec.get("step") or "step"
        if not isinstance(code, str) or not isinstance(step, str):
            return None
        if len(code) > COMPILE_MAX_CHARS:
            return None
        key = (step, code)
        compiled = self.codes.pop(key, None)
        if compiled is None:
            try:
                compiled = self.runner.compile_step(code, step)
            except Exception:  # a syntax error (or worse): the command reports it itself
                return None
            if len(self.codes) >= self.keep:
                del self.codes[next(iter(self.codes))]
        self.codes[key] = compiled  # (most recent last)
        return compiled


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
        #: command process pid -> the read end of its start-failure pipe, until EOF
        self.starting: dict[int, int] = {}
        #: command process pid -> what it wrote there (why it could not start)
        self.failures: dict[int, bytes] = {}
        self.me = os.getpid()
        self.children_path = f"/proc/{self.me}/task/{self.me}/children".encode()
        #: the environment the server runs with: a command asking for the same one keeps it
        self.env = dict(os.environ)
        self.compiled = CompiledCode(runner)

    # -- the tree --------------------------------------------------------------------------

    def children(self) -> list[int]:
        try:
            fd = os.open(self.children_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return [pid for pid, ppid in _ppids() if ppid == self.me]
        try:
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        finally:
            os.close(fd)
        return [int(p) for p in data.split()]

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
        if pid in self.starting:  # it is dead: the pipe's write end is closed
            self.read_failure(pid, until_eof=True)
        failure = self.failures.pop(pid, b"")
        with contextlib.suppress(OSError):
            if failure:
                send_frame(conn, {"error": failure.decode("utf-8", "replace")})
            else:
                flag = b"true" if killed else b"false"
                send_raw(conn, b'{"status": %d, "killed": %s}' % (status, flag))
        conn.close()

    def read_failure(self, pid: int, *, until_eof: bool = False) -> None:
        """Read what the command's process wrote on its start-failure pipe; close it at EOF
        (the process ran its command, or exited)."""
        fd = self.starting[pid]
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                if not until_eof:
                    return
                os.set_blocking(fd, True)
                continue
            except OSError:
                chunk = b""
            if not chunk:
                del self.starting[pid]
                os.close(fd)
                return
            self.failures[pid] = (self.failures.get(pid, b"") + chunk)[:8000]
            if not until_eof:
                return

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
        """Fork the command's process, answer its pid, let it go; never wait for it (its
        start failure, if any, comes on a pipe the loop watches)."""
        conn.settimeout(10)
        req, fds = recv_request(conn)
        try:
            if not isinstance(req, dict):
                conn.close()
                return
            wanted = 3 if req.get("kind") == "python" else 2
            if len(fds) != wanted:
                with contextlib.suppress(OSError):
                    why = f"the request carries {len(fds)} files, not {wanted}"
                    send_frame(conn, {"error": why})
                conn.close()
                return
            env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
            compiled = self.compiled.get(req.get("spec")) if req.get("kind") == "python" else None
            err_r, err_w = os.pipe()
            go_r, go_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(err_r)
                os.close(go_w)
                _child(
                    req, fds, env, env == self.env, self.config, self.runner, err_w, go_r, compiled
                )
        finally:
            for fd in fds:
                os.close(fd)
        os.close(err_w)
        os.close(go_r)
        os.set_blocking(err_r, False)
        conn.settimeout(None)
        self.commands[pid] = conn
        self.starting[pid] = err_r
        try:
            send_raw(conn, b'{"pid": %d}' % pid)
            sent = True
        except OSError:
            sent = False
        with contextlib.suppress(OSError):
            os.write(go_w, b"g" if sent else b"x")
        os.close(go_w)
        if not sent:
            self.finish(pid, killed=True)

    def message(self, pid: int) -> None:
        """The worker wrote (``{"kill": true}``) or hung up: kill the command."""
        msg = recv_frame_quiet(self.commands[pid])
        if msg is None or (isinstance(msg, dict) and msg.get("kill")):
            self.finish(pid, killed=True)

    def read_ready(self, ready: list[int], conns: dict[int, int], pipes: dict[int, int]) -> None:
        """Starting commands' failure pipes, then running commands' connections, that are
        ready to read."""
        for fd in ready:
            pid = pipes.get(fd)
            if pid is not None and self.starting.get(pid) == fd:
                self.read_failure(pid)
        for fd in ready:
            pid = conns.get(fd)
            if pid is not None and pid in self.commands:
                self.message(pid)

    def accept_waiting(self, listener: socket.socket) -> None:
        for _ in range(16):  # the requests waiting, several per wake-up
            try:
                conn, _ = listener.accept()
            except OSError:  # (BlockingIOError: none left)
                break
            self.start(conn)

    def run(self, listener: socket.socket, wake_r: int) -> None:
        # A SIGTERM is not the server's business: one sent to every process of the service (a
        # service manager's stop) is meant for the worker, which ends the running commands it
        # must end itself and then closes our stdin. Only that EOF stops the server.
        signal.signal(signal.SIGTERM, lambda *_: None)
        while True:
            conns = {conn.fileno(): pid for pid, conn in self.commands.items()}
            pipes = {fd: pid for pid, fd in self.starting.items()}
            try:
                ready, _, _ = select.select(
                    [listener.fileno(), wake_r, 0, *conns, *pipes], [], [], 1.0
                )
            except InterruptedError:
                continue
            if 0 in ready and not os.read(0, 4096):
                break  # the worker is gone
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            self.read_ready(ready, conns, pipes)
            self.sweep()
            if listener.fileno() in ready:
                self.accept_waiting(listener)
        for pid in list(self.commands):
            self.finish(pid, killed=True)
        self.kill_session(-1, limit=5)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: Set by :func:`serve` when the server holds capabilities without being root (a worker given
#: CAP_SETUID/CAP_SETGID/CAP_KILL as ambient capabilities): every command's process calls it,
#: after switching to the run-as user, to give up every capability before it runs anything.
DROP_CAPS: Any = None


def _held_capabilities() -> bool:
    sets = (b"CapPrm:", b"CapEff:", b"CapAmb:")
    try:
        with open("/proc/self/status", "rb") as fh:
            return any(int(x.split()[1], 16) for x in fh if x.startswith(sets))
    except (OSError, ValueError):
        return True  # unknown: drop them (a failure to drop is then the command's error)


def capability_dropper() -> Any:
    """A function that clears every capability set of the calling process (raises if it
    cannot), or None when there is nothing to drop (root loses them at setuid by itself)."""
    if os.geteuid() == 0 or not _held_capabilities():
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    empty = (_CapData * 2)()

    def drop() -> None:
        if libc.capset(ctypes.byref(header), empty) != 0:
            raise OSError(ctypes.get_errno(), "cannot drop the worker's capabilities")

    return drop


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


#: A step of the server's own, run by :func:`warm_up`.
WARM_UP_STEP = "def main(x):\n    return {'y': [x, str(x)]}\n"
#: Runs of it: enough for the interpreter to specialise what it runs (Python 3.11+).
WARM_UP_RUNS = 200


def warm_up(runner: Any) -> None:
    """Run a step of the server's own through the runner, in the server, before serving: the
    interpreter specialises the runner's code as it runs it, writing to its code objects, and a
    command's process that did that itself would copy every page it wrote (~20 of the ~270 a
    small step's process copies). Nothing of a command is involved: this is the server's own
    constant step, its output thrown away."""
    spec = {"code": WARM_UP_STEP, "args": {"x": 1}, "step": "warm-up", "memory_mb": None}
    sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        compiled = runner.compile_step(WARM_UP_STEP, "warm-up")
        for _ in range(WARM_UP_RUNS):
            runner.run_to_fd(spec, sink, compiled)
    finally:
        os.close(sink)


def serve(config: dict[str, Any]) -> int:
    global DROP_CAPS
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    DROP_CAPS = capability_dropper()
    ceilings = dict(config.get("limits") or {})
    ceilings.pop("cpu_seconds", None)  # per process: set in each command's process
    set_limits(ceilings)
    runner = _load_runner(config["runner"])
    for name in config.get("preload") or ():
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(config["socket"])
    listener.listen(256)
    listener.setblocking(False)
    os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.close(devnull)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    warm_up(runner)
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
