"""The life-cycle state and how it is written down. Pure.

``agent.core.lifecycle`` moves it from one state to the next; this module only says what a
state is, so that what merely reads it (the journal, the witness, ``edgeops status``) need
not build the transition table with its two dozen event and action records (about a third
of ``status``'s start-up on a slow core), nor the records a transition leaves in the
journal (``agent.core.records``), which only a writer needs.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

MAX_TRIAL_BOOTS = 3


class Phase(enum.StrEnum):
    IDLE = "idle"
    WRITING = "writing"
    WRITTEN = "written"
    TRIAL_PENDING = "trial-pending"
    TESTING = "testing"
    COMMITTING = "committing"
    REVERTING = "reverting"


# A NamedTuple, not a dataclass: 'edgeops status' reads it, and Python 3.11 compiles each
# dataclass's methods at import (tools/bench/startup.py); ``_replace`` is ``dataclasses.replace``.
class State(NamedTuple):
    phase: Phase = Phase.IDLE
    target: str | None = None  # slot being installed or tried
    previous: str | None = None  # the committed slot to fall back to
    version: str | None = None
    security_version: int = 0
    install_boot_id: str | None = None  # the boot during which the install ran
    trial_boots: int = 0
    health: dict[str, Any] | None = None  # per-bundle health overrides

    def to_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["phase"] = str(self.phase)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        return cls(**{**d, "phase": Phase(d["phase"])})
