"""The idle service: a standard-library parent decides each wake-up, a worker process does the work."""

from __future__ import annotations

import pytest

from agent.core import lifecycle
from agent.core.lifecycle import Phase, State


# --- lifecycle.needs_cycle ----------------------------------------------------------------------
def _in(phase: Phase) -> State:
    """Slot B being installed from A during boot b0; from TESTING on, b1 is the trial boot."""
    boot = "b1" if phase in (Phase.TESTING, Phase.COMMITTING, Phase.REVERTING) else "b0"
    return State(phase, "B", "A", "2.0", 1, boot, 1)


@pytest.mark.parametrize("state, booted, boot_id, due", [
    (State(), "A", "b0", False),  # idle: nothing to do, ever
    (State(), "B", "b9", False),
    (_in(Phase.WRITING), "A", "b0", True),  # the installer died: mark the slot empty again
    (_in(Phase.WRITING), "A", "b1", True),  # power was lost while writing
    (_in(Phase.WRITTEN), "A", "b0", True),  # the trial flag is still to be set
    (_in(Phase.TRIAL_PENDING), "A", "b0", False),  # armed, waiting for its reboot
    (_in(Phase.TRIAL_PENDING), "B", "b1", True),  # the trial boot: start the checks
    (_in(Phase.TRIAL_PENDING), "A", "b1", True),  # the bootloader fell back: record it
    (_in(Phase.TESTING), "B", "b1", True),  # the agent restarted mid-trial: check again
    (_in(Phase.COMMITTING), "B", "b1", True),
    (_in(Phase.REVERTING), "A", "b2", True),
])
def test_needs_cycle(state: State, booted: str, boot_id: str, due: bool) -> None:
    assert lifecycle.needs_cycle(state, booted, boot_id) is due


def test_needs_cycle_is_exactly_whether_booted_changes_anything() -> None:
    for phase in Phase:
        for booted, boot_id in (("A", "b0"), ("B", "b1"), ("A", "b1")):
            s = _in(phase) if phase is not Phase.IDLE else State()
            t = lifecycle.step(s, lifecycle.Booted(booted, boot_id))
            quiet = t.state == s and not t.records and not t.actions and t.then is None
            assert lifecycle.needs_cycle(s, booted, boot_id) is not quiet
