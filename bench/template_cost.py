"""What a command's templates cost where they are evaluated (docs/benchmarks.md).

Runs ``execute`` (the dispatcher's path: the isolated templates included) of a ``python``
command (process mode) and of an ``http`` command (to a local server) per template shape, one
command at a time, and prints the median and p95 milliseconds per command:

* ``none``     no template;
* ``lookup``   ``{{ input.a }}`` — bounded: evaluated in the worker's process;
* ``isolated`` ``{{ input.a + 1 }}`` — arithmetic: evaluated in a sandboxed child.

No database. Usage: ``python bench/template_cost.py [--runs 300]``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from noetl_pgworker.dispatcher import execute
from noetl_pgworker.models import Command
from noetl_pgworker.tools import default_registry

try:
    from noetl_pgworker.tools import Confinement
except ImportError:  # (a checkout from before it existed: measured the same way)
    Confinement = None  # type: ignore[assignment,misc]

SHAPES = {"none": "7", "lookup": "{{ input.a }}", "isolated": "{{ input.a + 1 }}"}
CODE = "def main(x):\n    return {'x': x}\n"


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


def command(kind: str, template: str, port: int) -> Command:
    if kind == "python":
        config: dict[str, Any] = {"code": CODE, "args": {"x": template}}
    else:
        config = {"url": f"http://127.0.0.1:{port}/{template}"}
    return Command(
        command_id="1",
        execution_id=1,
        step="s",
        tool_kind=kind,
        catalog_id=1,
        input={"tool_config": config, "input": {"a": 41}},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    runs = parser.parse_args().runs
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    if Confinement is not None:
        registry = default_registry(confinement=Confinement(http_allow_loopback=True))
    else:
        registry = default_registry()
    registry.start()
    try:
        for kind in ("python", "http"):
            for shape, template in SHAPES.items():
                cmd = command(kind, template, port)
                for _ in range(20):  # warm
                    execute(cmd, registry, timeout=30)
                took = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    outcome = execute(cmd, registry, timeout=30)
                    took.append((time.perf_counter() - t0) * 1000)
                    assert outcome.ok, outcome.error
                took.sort()
                p95 = took[int(len(took) * 0.95) - 1]
                p50 = statistics.median(took)
                print(f"{kind:7} {shape:9} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms")
    finally:
        registry.close()
        httpd.shutdown()


if __name__ == "__main__":
    main()
