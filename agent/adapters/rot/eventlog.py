"""The measurement log on disk: events appended one durable line at a time, under the state dir."""

from __future__ import annotations

import os
from pathlib import Path

from agent.adapters.rot.base import TpmError
from agent.core import eventlog
from agent.core.attest import Event


class EventLog:
    """Measurements in the order they were extended, one JSON line each (``agent.core.eventlog``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self) -> list[Event]:
        """Complete lines only: a line torn by a power cut was never followed by its extend."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return eventlog.decode(data)
        except eventlog.CorruptLog:
            raise TpmError(f"measurement log {self.path} is corrupt",
                           hint="the quote cannot be explained; re-provision or reboot to reset the PCRs "
                                "and the log") from None

    def append(self, event: Event) -> None:
        """Add one line and fsync it before returning: the caller extends the PCR only after this."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end:  # drop a torn last line so the new one starts on a line of its own
                f.seek(0)
                keep = eventlog.complete_length(f.read())
                if keep != end:
                    f.truncate(keep)
            f.write(eventlog.encode(event))
            f.flush()
            os.fsync(f.fileno())

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


__all__ = ["EventLog"]
