"""The fork server: restarted when it dies, commands that waited for it retried once,
preloaded modules, nothing shared between commands."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.errors import ConfigError
from noetl_pgworker.models import Command, Outcome
from noetl_pgworker.tools import ToolRegistry, default_registry
from noetl_pgworker.tools.python import PythonTool

pytestmark = pytest.mark.integration

RUN_AS = "nobody" if os.geteuid() == 0 else None


def python(code: str, **config: Any) -> Command:
    return Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind="python",
        catalog_id=1,
        input={"tool_config": {"code": code, **config}, "input": {}},
    )


def sandbox_of(registry: ToolRegistry) -> Any:
    tool = registry.get("python")
    assert isinstance(tool, PythonTool) and tool.sandbox is not None
    return tool.sandbox


def test_commands_waiting_for_a_dead_fork_server_are_retried_on_a_new_one() -> None:
    registry = default_registry(run_as=RUN_AS)
    sandbox = sandbox_of(registry)
    try:
        registry.start()
        first = sandbox.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # it accepts nothing: the commands wait for it
        outcomes: list[Outcome] = []
        threads = [
            threading.Thread(
                target=lambda i=i: outcomes.append(
                    execute(python(f"result = {i}"), registry, timeout=30)
                )
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert sorted(o.data for o in outcomes) == [0, 1, 2, 3], [o.error for o in outcomes]
        assert sandbox.restarts == 1 and sandbox.pid not in (None, first)
    finally:
        registry.close()


def test_a_command_that_kills_the_fork_server_fails_and_the_next_one_runs() -> None:
    # Without --run-as a child runs as the fork server's user and can kill it.
    registry = default_registry()
    sandbox = sandbox_of(registry)
    code = "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(5)\nresult = 1"
    try:
        for _ in range(3):
            out = execute(python(code), registry, timeout=30)
            assert not out.ok and out.error_type == "sandbox", out.error
            assert "fork server was killed while the command ran" in (out.error or "")
        ok = execute(python("result = 'fine'"), registry, timeout=30)
        assert ok.ok and ok.data == "fine"
        assert sandbox.restarts >= 2
    finally:
        registry.close()


def test_preloaded_modules_are_imported_once_in_the_fork_server() -> None:
    code = "import sys\nresult = ['decimal' in sys.modules, 'json' in sys.modules]"
    warm = default_registry(python_preload=["decimal"])
    cold = default_registry()
    try:
        assert execute(python(code), warm).data == [True, True]
        assert execute(python(code), cold).data == [False, True]  # the runner's own modules
    finally:
        warm.close()
        cold.close()
    broken = default_registry(python_preload=["no_such_module_pgw"])
    with pytest.raises(ConfigError, match="no_such_module_pgw"):
        broken.start()
    broken.close()


def test_nothing_is_shared_between_commands() -> None:
    registry = default_registry()
    code = (
        "import sys, random\n"
        "seen = getattr(sys, 'pgw_seen', None)\n"
        "sys.pgw_seen = 'mine'\n"
        "result = [seen, random.random()]\n"
    )
    try:
        a = execute(python(code), registry).data
        b = execute(python(code), registry).data
        assert a[0] is None and b[0] is None
        assert a[1] != b[1]  # each fork reseeds
    finally:
        registry.close()


def test_a_child_cannot_read_the_fork_server() -> None:
    registry = default_registry(run_as=RUN_AS)
    code = (
        "import os\n"
        "try:\n"
        "    open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
        "    result = 'read'\n"
        "except OSError as exc:\n"
        "    result = type(exc).__name__\n"
    )
    try:
        assert execute(python(code), registry).data == "PermissionError"
    finally:
        registry.close()


def test_closing_the_registry_stops_the_fork_server_and_what_it_runs() -> None:
    registry = default_registry()
    sandbox = sandbox_of(registry)
    registry.start()
    pid = sandbox.pid
    done = threading.Event()
    out: list[Outcome] = []

    def long() -> None:
        out.append(execute(python("import time\ntime.sleep(60)"), registry, timeout=120))
        done.set()

    threading.Thread(target=long, daemon=True).start()
    time.sleep(0.5)
    registry.close()
    assert done.wait(15)
    assert not out[0].ok
    assert pid is not None and not os.path.exists(f"/proc/{pid}/stat")


def test_a_command_runs_in_the_scratch_directory_with_none_of_the_servers_files() -> None:
    registry = default_registry(run_as=RUN_AS)
    code = (
        "import os\n"
        "fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
        "result = {'cwd': os.getcwd(), 'fds': fds,\n"
        "          'out': os.readlink('/proc/self/fd/1'), 'uid': os.getuid()}\n"
    )
    try:
        out = execute(python(code), registry)
        assert out.ok, out.error
        # No directory per command (the sandbox's scratch one, never /): its output and
        # result files have no name anywhere.
        assert out.data["cwd"] != "/" and "noetl-pgworker-scratch-" in out.data["cwd"]
        assert "(deleted)" in out.data["out"] or "memfd:" in out.data["out"]
        # stdin, stdout, stderr, the result file, the listing's own: nothing of the server's
        fds = out.data["fds"]
        assert len(fds) == 5 and fds[:3] == [0, 1, 2], fds
        assert (out.data["uid"] != 0) == bool(RUN_AS)
    finally:
        registry.close()


def test_commands_that_start_and_end_at_once_all_get_their_own_result() -> None:
    registry = default_registry(run_as=RUN_AS)
    try:
        registry.start()
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def run(i: int) -> None:
            code = f"import sys\nprint({i})\nprint({i}, file=sys.stderr)\nresult = {i}"
            out = execute(python(code), registry, timeout=30)
            with lock:
                outcomes.append(out)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 40 and all(o.ok for o in outcomes), [o.error for o in outcomes]
        for o in outcomes:
            assert o.extra == {"_stdout": f"{o.data}\n", "_stderr": f"{o.data}\n"}
        assert sorted(o.data for o in outcomes) == list(range(40))
    finally:
        registry.close()


def test_output_files_are_reused_empty_and_never_after_an_unsure_end() -> None:
    registry = default_registry(run_as=RUN_AS)
    sandbox = sandbox_of(registry)
    try:
        registry.start()
        loud = execute(python("print('x' * 5000)\nresult = 1"), registry, timeout=30)
        assert loud.ok and (loud.extra or {}).get("_stdout", "").startswith("x" * 5000)
        spare = list(sandbox._spare_outputs)
        assert len(spare) == 2  # both output files kept for the next command, emptied
        assert all(os.fstat(fd).st_size == 0 for fd in spare)
        quiet = execute(python("result = 2"), registry, timeout=30)
        assert quiet.ok and quiet.data == 2
        assert "_stdout" not in (quiet.extra or {})  # nothing of the command before it
        assert sorted(sandbox._spare_outputs) == sorted(spare)  # the same two files again
        again = execute(python("print('y')\nresult = 3"), registry, timeout=30)
        assert (again.extra or {}).get("_stdout") == "y\n"  # written from the start again
        # Timed out: the files are not handed to another command (kept only after the fork
        # server reports every process of the command dead).
        slow = execute(
            python("import time\nprint('late', flush=True)\ntime.sleep(30)"), registry, timeout=1
        )
        assert not slow.ok
        assert not set(sandbox._spare_outputs) & set(spare)
    finally:
        registry.close()
    assert sandbox._spare_outputs == []


@pytest.mark.parametrize("unnamed_files", [True, False], ids=["O_TMPFILE", "memfd"])
def test_an_emptied_output_file_is_written_from_its_start(
    unnamed_files: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from noetl_pgworker.tools.process import Sandbox

    if not unnamed_files:
        monkeypatch.delattr(os, "O_TMPFILE")  # the fallback: a memory file
    fd = Sandbox.output_file()
    try:
        os.write(fd, b"a long first output")
        os.ftruncate(fd, 0)  # what reuse does: no seek back
        other = os.dup(fd)  # (a command writes through its own descriptor)
        os.write(other, b"next")
        os.close(other)
        assert os.pread(fd, 100, 0) == b"next"
    finally:
        os.close(fd)


def test_code_compiled_by_the_fork_server_runs_fresh_in_each_command() -> None:
    """The fork server compiles a request's code before the fork and keeps the code object for
    the same step and source (a loop's iterations): module state is still per command, the
    arguments differ, and code that does not compile fails in the command as before."""
    registry = default_registry()
    code = "seen = []\ndef main(x):\n    seen.append(x)\n    return {'x': x, 'seen': len(seen)}\n"

    def step(x: int, name: str = "s") -> Command:
        return Command(
            command_id="1",
            execution_id=1,
            step=name,
            tool_kind="python",
            catalog_id=1,
            input={"tool_config": {"code": code}, "input": {"x": x}},
        )

    try:
        registry.start()
        outs = [execute(step(x), registry, timeout=30).data for x in (1, 2, 3)]
        assert outs == [{"x": 1, "seen": 1}, {"x": 2, "seen": 1}, {"x": 3, "seen": 1}]
        broken = execute(python("def main(:\n"), registry, timeout=30)
        assert not broken.ok and "SyntaxError" in str(broken.error)
        assert execute(step(9, "other"), registry, timeout=30).data == {"x": 9, "seen": 1}
    finally:
        registry.close()


def test_the_fork_server_compiles_and_keeps_a_bounded_number_of_code_objects() -> None:
    from noetl_pgworker.tools import pyrunner
    from noetl_pgworker.tools.forkserver import COMPILE_MAX_CHARS, CompiledCode

    cache = CompiledCode(pyrunner, keep=2)
    one = cache.get({"code": "result = 1", "step": "a"})
    assert one is not None and cache.get({"code": "result = 1", "step": "a"}) is one
    assert cache.get({"code": "result = 1", "step": "b"}) is not one  # the step names the file
    cache.get({"code": "result = 2", "step": "a"})
    assert len(cache.codes) == 2 and ("a", "result = 1") not in cache.codes
    assert cache.get({"code": "def f(:", "step": "a"}) is None  # left to the command
    assert cache.get({"code": "x = 1\n" * COMPILE_MAX_CHARS, "step": "a"}) is None
    assert cache.get({"code": 5}) is None and cache.get("nonsense") is None
