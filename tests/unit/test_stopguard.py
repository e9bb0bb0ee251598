"""The stop deadline: past it, what is unwritten is kept and the process ends."""

from __future__ import annotations

import threading

import pytest

from noetl_pgworker.stopguard import StopDeadline

pytestmark = pytest.mark.unit


def test_expires_keeping_first_then_exiting() -> None:
    calls: list[str] = []
    exited = threading.Event()

    def keep() -> int:
        calls.append("keep")
        return 3

    def exit_now(status: int) -> None:
        calls.append(f"exit {status}")
        exited.set()

    deadline = StopDeadline(0.2, keep, exit_now=exit_now)
    deadline.arm()
    deadline.arm()  # once only
    assert exited.wait(10)
    assert calls == ["keep", "exit 1"]


def test_disarmed_in_time_does_nothing() -> None:
    calls: list[int] = []
    deadline = StopDeadline(0.3, lambda: 0, exit_now=calls.append)
    deadline.arm()
    deadline.disarm()
    threading.Event().wait(0.6)
    assert calls == []


def test_exits_even_when_keeping_fails() -> None:
    codes: list[int] = []

    def broken() -> int:
        raise OSError("disk full")

    StopDeadline(60, broken, exit_now=codes.append).expire("second signal", status=130)
    assert codes == [130]
