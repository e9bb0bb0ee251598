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
                for item in items:
                    fh.write(dumps(item.to_json()) + "\n")
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
        return len(items)

    def take(self) -> list[Spooled]:
        """What an earlier run kept, removing the file; unreadable lines are logged, skipped."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            logger.error("cannot read the spool %s: %s", self.path, exc)
            return []
        items: list[Spooled] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(Spooled.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("spool %s line %d is unreadable (%s); skipped", self.path, number, exc)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return items
