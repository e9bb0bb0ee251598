"""Outcomes kept on disk when the worker must stop while the database (or server) is away.

A graceful stop during an outage would otherwise drop what finished commands produced: their
rows stay claimed, are taken back after the lease, and run again. With a spool directory
(``--spool-dir``, or systemd's ``$STATE_DIRECTORY``) they are written to
``<dir>/<worker id>.jsonl`` instead, and the next start under the same worker id hands them to
its writer first: the write is fenced as always, so an outcome whose command was meanwhile
taken over changes nothing. The file is removed once its outcomes are handed over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .jsontext import dumps
from .models import CommandRef, Outcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Spooled:
    """One finished command whose outcome was not written."""

    ref: CommandRef
    outcome: Outcome
    started_at: datetime | None = None
    loop_event_id: str | None = None
    iter_index: int | None = None
    unfenced: bool = False
    start_written: bool = False

    def to_json(self) -> dict[str, Any]:
        o = self.outcome
        r = self.ref
        return {
            "ref": {
                "execution_id": r.execution_id,
                "command_id": r.command_id,
                "catalog_id": r.catalog_id,
                "step": r.step,
                "tool_kind": r.tool_kind,
                "parent_execution_id": r.parent_execution_id,
                "meta_command_id": r.meta_command_id,
                "loop_epoch_id": r.loop_epoch_id,
                "loop_index": r.loop_index,
                "attempt": r.attempt,
            },
            "outcome": {
                "ok": o.ok,
                "data": o.data,
                "error": o.error,
                "error_type": o.error_type,
                "duration": o.duration,
                "started_at": o.started_at.isoformat() if o.started_at else None,
                "extra": o.extra,
            },
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "loop_event_id": self.loop_event_id,
            "iter_index": self.iter_index,
            "unfenced": self.unfenced,
            "start_written": self.start_written,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Spooled:
        o = raw["outcome"]
        return cls(
            ref=CommandRef(**raw["ref"]),
            outcome=Outcome(
                ok=bool(o["ok"]),
                data=o.get("data"),
                error=o.get("error"),
                error_type=o.get("error_type"),
                duration=float(o.get("duration") or 0.0),
                started_at=_time(o.get("started_at")),
                extra=o.get("extra"),
            ),
            started_at=_time(raw.get("started_at")),
            loop_event_id=raw.get("loop_event_id"),
            iter_index=raw.get("iter_index"),
            unfenced=bool(raw.get("unfenced")),
            start_written=bool(raw.get("start_written")),
        )


def _line(item: Spooled) -> str | None:
    """One spool line; None (logged) for an outcome that cannot be serialised."""
    try:
        return dumps(item.to_json()) + "\n"
    except (RecursionError, ValueError, TypeError) as exc:
        logger.error(
            "command %s: its outcome cannot be kept in the spool (%s); it will be recovered"
            " after the lease",
            item.ref.command_id,
            "nested too deeply" if isinstance(exc, RecursionError) else exc,
            extra={"action": "spool_failed"},
        )
        return None


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class Spool:
    """The spool file of one worker id."""

    def __init__(self, directory: Path, worker_id: str) -> None:
        self.directory = directory
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id) or "worker"
        self.path = directory / f"{safe}.jsonl"

    def save(self, items: list[Spooled]) -> int:
        """Append ``items``; returns how many were kept (0 if the file cannot be written)."""
        if not items:
            return 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                lines = [line for line in map(_line, items) if line is not None]
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            logger.error(
                "could not keep %d unwritten outcome(s) in %s: %s",
                len(items),
                self.path,
                exc,
                extra={"action": "spool_failed"},
            )
            return 0
        return len(lines)

    def take(self) -> list[Spooled]:
        """What an earlier run kept, removing the file. A line that cannot be read (not JSON,
        not an outcome, nested too deeply to parse) is logged and moved to
        ``<file>.rejected``, never lost and never in the way of the others."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as exc:
            logger.error("cannot read the spool %s: %s", self.path, exc)
            return []
        items: list[Spooled] = []
        rejected: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(Spooled.from_json(json.loads(line)))
            except RecursionError:
                self._reject(number, "nested too deeply to read", line, rejected)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self._reject(number, str(exc) or type(exc).__name__, line, rejected)
        if rejected and not self._keep_rejected(rejected):
            return items  # the file stays: nothing of it is lost
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return items

    @property
    def rejected_path(self) -> Path:
        return self.path.with_name(self.path.name + ".rejected")

    def _reject(self, number: int, why: str, line: str, rejected: list[str]) -> None:
        logger.error(
            "spool %s line %d is unreadable (%s); set aside in %s",
            self.path,
            number,
            why[:200],
            self.rejected_path,
            extra={"action": "spool_rejected"},
        )
        rejected.append(line)

    def _keep_rejected(self, lines: list[str]) -> bool:
        try:
            fd = os.open(self.rejected_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in lines))
        except OSError as exc:
            logger.error(
                "cannot set aside unreadable spool lines in %s (%s); %s is kept as it is",
                self.rejected_path,
                exc,
                self.path,
            )
            return False
        return True
