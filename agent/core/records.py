"""What a transition records in the journal, in the same transaction as its state. Pure.

Apart from ``agent.core.state`` because only a writer of the journal needs them (and
``HistoryRow``, a history entry as the journal gives it back): ``edgeops status`` reads
the state and never builds these (tools/bench/startup.py).
"""

from __future__ import annotations

from agent.core.frozen import Frozen


class SlotRecord(Frozen):
    """Journal: what a slot now holds."""

    slot: str
    state: str  # good | bad | trial | empty | written
    version: str | None = None
    security_version: int | None = None


class RaiseFloor(Frozen):
    security_version: int


class History(Frozen):
    event: str  # installing, installed, trial, committed, reverted, failed, interrupted
    slot: str | None
    version: str | None
    detail: str = ""


Record = SlotRecord | RaiseFloor | History


class HistoryRow(Frozen):
    """A ``History`` as the journal gives it back: its row id and when it was written."""

    id: int
    ts: float
    event: str
    slot: str | None
    version: str | None
    detail: str
