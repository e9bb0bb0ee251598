"""What the worker holds: threads, and claims whose outcome is not written yet.

Two budgets, both :class:`Slots`:

- **threads** (``concurrency``): one is reserved *before* a claim, so that every claimed command
  starts at once; it is given back when the tool is done and its outcome handed over.
- **claims** (``concurrency`` + ``max_pending_writes``): one per claim held in the database,
  given back when its outcome is written (or refused by the fence). The threads can run the
  next commands while writes are under way, within this bound; when the database is slow or
  away, outcomes pile up and claiming stops.

:class:`InFlight` owns both and the bookkeeping of which command holds what, so that every path
that ends a command (its outcome written, its hand-over failed, a claim never started) gives
back exactly what the command held, and nothing twice.
"""

from __future__ import annotations

import threading
import time

from .models import CommandRef

Key = tuple[int, int]  # (execution_id, command_id)


class Slots:
    """A counter of free slots, with waits that time out."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("at least one slot is needed")
        self.total = total
        self._free = total
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> bool:
        """Take one slot; False if none freed up within ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free > 0, timeout=timeout):
                return False
            self._free -= 1
            return True

    def release(self, n: int = 1) -> None:
        with self._cond:
            if self._free + n > self.total:
                raise RuntimeError("slot released twice")
            self._free += n
            self._cond.notify(n)

    def available(self) -> int:
        with self._cond:
            return self._free

    def in_use(self) -> int:
        with self._cond:
            return self.total - self._free

    def wait_available(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` slots are free; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._free >= n, timeout=timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every slot is free; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._free == self.total, timeout=timeout)


def _key(ref: CommandRef) -> Key:
    return (ref.execution_id, ref.command_id)


class InFlight:
    """The threads and claims of one worker, and which command holds which."""

    def __init__(self, concurrency: int, pending_writes: int | None = None) -> None:
        self.threads = Slots(concurrency)
        #: ``pending_writes`` claims beyond the threads may wait for their outcome's write.
        self.claims = Slots(
            concurrency + (concurrency if pending_writes is None else pending_writes)
        )
        self._lock = threading.Lock()
        #: Commands on a thread, and how many threads each holds (a suspect command: all).
        self._threads_of: dict[Key, int] = {}
        #: Commands holding a claim slot (until their outcome is written).
        self._claimed: set[Key] = set()
        #: Commands whose tool runs, with its ref and since when (monotonic).
        self._running: dict[Key, tuple[CommandRef, float]] = {}
        #: When a command last finished, and the typical gap between two finishing (a moving
        #: average, seconds): how soon another thread is likely to be free.
        self._last_finish = 0.0
        self._finish_gap = 1.0

    # -- the claim loop ----------------------------------------------------------------------

    def reserve(self, timeout: float) -> bool:
        """Reserve a claim and a thread for the next command; False (nothing held) if either
        stays taken for ``timeout`` seconds."""
        if not self.claims.acquire(timeout):
            return False
        if not self.threads.acquire(timeout):
            self.claims.release()
            return False
        return True

    def unreserve(self) -> None:
        """Give back a reservation that no command took."""
        self.threads.release()
        self.claims.release()

    def free(self) -> int:
        """How many more commands could start now, besides a reserved one."""
        return min(self.threads.available(), self.claims.available())

    def gathered_free(self, gather: float) -> int:
        """:meth:`free`, after waiting up to ``gather`` seconds for half the threads to be free
        when other commands are running and finishing fast enough for that: under load, one
        claim statement for several threads instead of one per thread. An idle worker, or one
        whose other commands run long, never waits."""
        target = max(1, self.threads.total // 2 - 1)  # besides the reserved thread
        free = self.free()
        if gather > 0 and free < target and self.finishing_within(gather, target - free):
            self.threads.wait_available(target, gather)
            free = self.free()
        return free

    def ahead(self, seconds: float) -> int:
        """Claims worth taking beyond :meth:`free`: twice as many commands as this worker has
        lately finished in ``seconds`` (one claim's round trip), so that threads freed
        meanwhile find their next command already claimed instead of a claim under way. Twice:
        a claim that takes only what one round trip consumes would hold the rate where it is;
        twice lets it grow until the threads, the claim slots or the machine are the limit.
        Such a command waits for its thread about two round trips at most; a worker whose
        commands run long (or none ran lately) claims nothing ahead. Only within the free
        claim slots."""
        with self._lock:
            gap = max(self._finish_gap, time.monotonic() - self._last_finish, 1e-6)
        likely = int(2 * seconds / gap)
        spare = self.claims.available() - self.free()
        return max(0, min(likely, spare))

    def finishing_within(self, seconds: float, count: int = 1) -> bool:
        """Whether ``count`` more commands are likely to finish within ``seconds`` (some are
        running, and lately commands have finished at least that often)."""
        with self._lock:
            return bool(self._threads_of) and count * self._finish_gap <= seconds

    def outcomes_worth_gathering(self, seconds: float) -> bool:
        """For the writer: wait for more outcomes only while other commands are likely to finish
        within ``seconds`` *and* the claim loop can still claim (a free claim slot); when every
        claim slot waits for its outcome's write, writing now is what frees the next claim."""
        return self.claims.available() > 0 and self.finishing_within(seconds)

    def take_other_threads(self, stop: threading.Event) -> int | None:
        """Take every other thread (waiting for running commands); None (nothing taken) if
        ``stop`` is set meanwhile. For a command that must run alone."""
        taken = 0
        while taken < self.threads.total - 1:
            if stop.is_set():
                if taken:
                    self.threads.release(taken)
                return None
            if self.threads.acquire(timeout=0.2):
                taken += 1
        return taken

    def hold(self, ref: CommandRef, threads: int = 1) -> None:
        """The reservation (and ``threads - 1`` more threads) now belongs to this command."""
        key = _key(ref)
        with self._lock:
            self._threads_of[key] = threads
            self._claimed.add(key)

    def hold_claim(self, ref: CommandRef) -> None:
        """A claim that runs on no thread (a malformed row, failed at once): it holds a claim
        slot until its failure is written, if one is free (it was claimed within the budget)."""
        if self.claims.acquire(timeout=0):
            with self._lock:
                self._claimed.add(_key(ref))

    # -- the tool threads --------------------------------------------------------------------

    def started(self, ref: CommandRef) -> None:
        with self._lock:
            self._running[_key(ref)] = (ref, time.monotonic())

    def finished(self, ref: CommandRef) -> None:
        """The tool is done (or its hand-over failed): its threads are free again.
        Idempotent."""
        with self._lock:
            key = _key(ref)
            threads = self._threads_of.pop(key, 0)
            self._running.pop(key, None)
            if threads:
                now = time.monotonic()
                gap = min(now - self._last_finish, 10.0)
                self._finish_gap += 0.2 * (gap - self._finish_gap)
                self._last_finish = now
        if threads:
            self.threads.release(threads)

    def written(self, ref: CommandRef) -> None:
        """Its outcome is written, refused by the fence, or will never be: the claim slot is
        free again. Idempotent."""
        with self._lock:
            if _key(ref) not in self._claimed:
                return
            self._claimed.discard(_key(ref))
        self.claims.release()

    # -- what others read --------------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        return self.threads.total

    def running(self) -> int:
        """Commands on a thread now."""
        with self._lock:
            return len(self._threads_of)

    def threads_busy(self) -> int:
        with self._lock:
            return sum(self._threads_of.values())

    def running_since(self) -> list[tuple[CommandRef, float]]:
        with self._lock:
            return list(self._running.values())

    def held_ids(self) -> list[int]:
        """Command ids on a thread now."""
        with self._lock:
            return [cid for _, cid in self._threads_of]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no thread is busy; False on timeout."""
        return self.threads.wait_idle(timeout)
