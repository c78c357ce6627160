"""What a transition records in the journal, in the same transaction as its state. Pure.

Apart from ``agent.core.state`` because only a writer of the journal needs them (and
``HistoryRow``, a history entry as the journal gives it back): ``edgeops status`` reads
the state and never builds these (tools/bench/startup.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlotRecord:
    """Journal: what a slot now holds."""

    slot: str
    state: str  # good | bad | trial | empty | written
    version: str | None = None
    security_version: int | None = None


@dataclass(frozen=True)
class RaiseFloor:
    security_version: int


@dataclass(frozen=True)
class History:
    event: str  # installing, installed, trial, committed, reverted, failed, interrupted
    slot: str | None
    version: str | None
    detail: str = ""


Record = SlotRecord | RaiseFloor | History


@dataclass(frozen=True)
class HistoryRow:
    """A ``History`` as the journal gives it back: its row id and when it was written."""

    id: int
    ts: float
    event: str
    slot: str | None
    version: str | None
    detail: str
