"""A TCP proxy that holds each chunk ``--delay-ms`` in each direction (network latency).

``python bench/delayproxy.py --upstream HOST:PORT --delay-ms 2`` listens on 127.0.0.1 (a free
port unless ``--port``), prints the port on its first line of stdout, and forwards every
connection to HOST:PORT. Each chunk read on one side is written to the other ``delay`` ms after
it was read, in order; bandwidth is not limited (chunks in flight overlap), so a round trip
costs 2 x delay more, as over a longer wire. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def _serve(upstream: tuple[str, int], port: int, delay: float) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*upstream)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pump(cr, uw, delay), _pump(ur, cw, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay each way, ms")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    try:
        asyncio.run(_serve((host, int(port)), args.port, args.delay_ms / 1000))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
