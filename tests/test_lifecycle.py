"""The install/boot state machine, tested directly: a table of (state, event) -> outcome."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import lifecycle as lc
from agent.core.lifecycle import Phase, State

BOOT0, BOOT1, BOOT2 = "boot-0", "boot-1", "boot-2"
INSTALL = lc.Install(target="B", previous="A", version="2.0", security_version=3, boot_id=BOOT0)


def at(phase: Phase, **kw: object) -> State:
    base = State(phase, "B", "A", "2.0", 3, BOOT0)
    return base._replace(**kw)  # type: ignore[arg-type]


def kinds(items: list[object]) -> list[str]:
    return [type(i).__name__ for i in items]


@pytest.mark.parametrize("state, event, phase, actions", [
    (State(), INSTALL, Phase.WRITING, ["BootMarkBad"]),
    (at(Phase.TRIAL_PENDING), INSTALL, Phase.WRITING, ["BootMarkBad"]),
    (at(Phase.WRITING), lc.WriteDone(), Phase.WRITTEN, ["BootSetTrial"]),
    (at(Phase.WRITING), lc.WriteFailed("bad block"), Phase.IDLE, []),
    (at(Phase.WRITTEN), lc.TrialSet(), Phase.TRIAL_PENDING, []),
    (at(Phase.TRIAL_PENDING), lc.Booted("A", BOOT0), Phase.TRIAL_PENDING, []),
    (at(Phase.TRIAL_PENDING), lc.Booted("B", BOOT1), Phase.TESTING, ["RunHealth"]),
    (at(Phase.TRIAL_PENDING), lc.Booted("A", BOOT1), Phase.IDLE, ["BootMarkBad"]),
    (at(Phase.TESTING, install_boot_id=BOOT1), lc.Booted("B", BOOT1), Phase.TESTING, ["RunHealth"]),
    (at(Phase.TESTING, install_boot_id=BOOT1), lc.Booted("A", BOOT2), Phase.IDLE, ["BootMarkBad"]),
    (at(Phase.TESTING), lc.HealthPassed(), Phase.COMMITTING, ["BootCommit"]),
    (at(Phase.TESTING), lc.HealthFailed("probe x"), Phase.REVERTING, ["BootMarkBad", "Reboot"]),
    (at(Phase.COMMITTING), lc.CommitDone(), Phase.IDLE, []),
    (at(Phase.COMMITTING), lc.Booted("B", BOOT2), Phase.COMMITTING, ["BootCommit"]),
    (at(Phase.COMMITTING), lc.Booted("A", BOOT2), Phase.IDLE, ["BootMarkBad"]),
    (at(Phase.REVERTING), lc.Booted("A", BOOT2), Phase.IDLE, ["BootMarkBad"]),  # again: idempotent
    (at(Phase.REVERTING), lc.Booted("B", BOOT2), Phase.REVERTING, ["BootMarkBad", "Reboot"]),
    (at(Phase.WRITING), lc.Booted("A", BOOT1), Phase.IDLE, ["BootMarkBad"]),
    (at(Phase.WRITING), lc.Booted("A", BOOT0), Phase.IDLE, ["BootMarkBad"]),
    # an older pending trial of the slot being written booted: leave it
    (at(Phase.WRITING), lc.Booted("B", BOOT2), Phase.IDLE, ["BootMarkBad", "Reboot"]),
    (at(Phase.WRITTEN), lc.Booted("A", BOOT1), Phase.WRITTEN, ["BootSetTrial"]),
    (at(Phase.WRITTEN), lc.Booted("B", BOOT1), Phase.TESTING, ["RunHealth"]),
    (State(), lc.Booted("A", BOOT1), Phase.IDLE, []),
    (State(), lc.Rollback("B", "1.0"), Phase.IDLE, ["BootCommit", "Reboot"]),
])
def test_transition_table(state: State, event: lc.Event, phase: Phase, actions: list[str]) -> None:
    t = lc.step(state, event)
    assert t.state.phase is phase
    assert kinds(t.actions) == actions  # type: ignore[arg-type]


@pytest.mark.parametrize("state, event", [
    (State(), lc.WriteDone()),
    (State(), lc.HealthPassed()),
    (at(Phase.TESTING), INSTALL),
    (at(Phase.COMMITTING), INSTALL),
    (at(Phase.REVERTING), INSTALL),
    (at(Phase.TRIAL_PENDING), lc.HealthPassed()),
    (at(Phase.TESTING), lc.Rollback("A", "1.0")),
])
def test_illegal_pairs_raise(state: State, event: lc.Event) -> None:
    with pytest.raises(lc.IllegalTransition, match="not possible while the device is"):
        lc.step(state, event)


def test_slot_is_made_unbootable_before_any_write() -> None:
    t = lc.step(State(), INSTALL)
    assert t.actions == [lc.BootMarkBad("B")]
    assert lc.SlotRecord("B", "empty") in t.records


def test_commit_raises_the_floor_and_marks_the_slot_good() -> None:
    t = lc.step(at(Phase.COMMITTING), lc.CommitDone())
    assert lc.RaiseFloor(3) in t.records
    assert lc.SlotRecord("B", "good", "2.0", 3) in t.records


def test_a_failed_trial_never_raises_the_floor() -> None:
    for t in (lc.step(at(Phase.TESTING), lc.HealthFailed("x")),
              lc.step(at(Phase.TRIAL_PENDING), lc.Booted("A", BOOT1))):
        assert not any(isinstance(r, lc.RaiseFloor) for r in t.records)
        assert lc.SlotRecord("B", "bad", "2.0", 3) in t.records


def test_trial_boots_are_capped() -> None:
    s = at(Phase.TESTING, install_boot_id=BOOT1, trial_boots=lc.MAX_TRIAL_BOOTS)
    t = lc.step(s, lc.Booted("B", BOOT2))
    assert t.state.phase is Phase.IDLE
    assert kinds(t.actions) == ["BootMarkBad", "Reboot"]  # type: ignore[arg-type]  # leave the rejected slot


def test_state_round_trips_through_its_dict() -> None:
    s = at(Phase.TESTING, health={"retries": 2})
    assert State.from_dict(s.to_dict()) == s


# --- a model of the board: the property holds for any sequence of events -----------------------
class Board:
    """A U-Boot bootcount board, the same decision as agent.adapters.simboard.SimFirmware."""

    def __init__(self) -> None:
        self.primary, self.trial, self.count, self.boot = "A", None, 0, 0
        self.booted = "A"
        self.good = {"A"}

    def act(self, a: lc.Action) -> None:
        match a:
            case lc.BootMarkBad(slot):
                if self.trial == slot:
                    self.trial = None
            case lc.BootSetTrial(slot):
                self.trial, self.count = slot, 0
            case lc.BootCommit(slot):
                self.primary, self.trial = slot, None

    def power_on(self) -> lc.Booted:
        self.boot += 1
        if self.trial is not None:
            self.count += 1
            if self.count > 1:
                self.trial = None
        self.booted = self.trial or self.primary
        return lc.Booted(self.booted, f"boot-{self.boot}")


events = st.lists(st.sampled_from(["install", "write-ok", "write-fail", "power", "pass", "fail"]),
                  max_size=40)


@settings(max_examples=400, deadline=None)
@given(events)
def test_any_event_sequence_keeps_a_committed_slot_bootable(seq: list[str]) -> None:
    board, state = Board(), State()
    floor = 0
    for name in seq:
        other = "B" if board.booted == "A" else "A"
        ev: lc.Event
        if name == "power":
            ev = board.power_on()
        else:
            ev = {
                "install": lc.Install(other, board.booted, "v", 1, f"boot-{board.boot}"),
                "write-ok": lc.WriteDone(),
                "write-fail": lc.WriteFailed("x"),
                "pass": lc.HealthPassed(),
                "fail": lc.HealthFailed("x"),
            }[name]
        try:
            t = lc.step(state, ev)
        except lc.IllegalTransition:
            continue
        state = t.state
        for r in t.records:
            if isinstance(r, lc.RaiseFloor):
                floor = max(floor, r.security_version)
            if isinstance(r, lc.SlotRecord):
                (board.good.add if r.state == "good" else board.good.discard)(r.slot)
        for a in t.actions:
            board.act(a)
            if isinstance(a, lc.BootSetTrial) and state.phase is Phase.WRITTEN:
                state = lc.step(state, lc.TrialSet()).state
            if isinstance(a, lc.BootCommit) and state.phase is Phase.COMMITTING:
                c = lc.step(state, lc.CommitDone())
                state = c.state
                board.good.add(a.slot)
        # The bootloader's committed slot always holds a version the journal calls good,
        # and a slot being written is never the one the bootloader would boot.
        assert board.primary in board.good
        if state.phase in (Phase.WRITING,):
            assert board.trial != state.target and board.primary != state.target


# --- follow-ups and reboots are data ------------------------------------------------------------
@pytest.mark.parametrize("state, event, then", [
    (at(Phase.WRITING), lc.WriteDone(), lc.TrialSet()),
    (at(Phase.WRITTEN), lc.Booted("A", BOOT1), lc.TrialSet()),
    (at(Phase.TESTING), lc.HealthPassed(), lc.CommitDone()),
    (at(Phase.COMMITTING), lc.Booted("B", BOOT2), lc.CommitDone()),
    (State(), lc.Rollback("B", "1.0"), None),  # BootCommit of a rollback ends nothing
    (at(Phase.TESTING), lc.HealthFailed("x"), None),
    (State(), INSTALL, None),
])
def test_the_event_after_the_actions_comes_from_the_table(state: State, event: lc.Event,
                                                          then: lc.Event | None) -> None:
    t = lc.step(state, event)
    assert t.then == then
    if then is not None:  # and it is legal in the state the transition left
        lc.step(t.state, then)


def test_reboot_into_the_armed_trial_is_an_action() -> None:
    t = lc.step(at(Phase.TRIAL_PENDING), lc.RebootIntoTrial("fleet action 7"))
    assert t.state == at(Phase.TRIAL_PENDING) and not t.records
    assert t.actions == [lc.Reboot("fleet action 7")]
    for phase in (Phase.IDLE, Phase.WRITING, Phase.TESTING):
        with pytest.raises(lc.IllegalTransition):
            lc.step(at(phase), lc.RebootIntoTrial("x"))


def test_can_install_matches_the_table() -> None:
    for phase in Phase:
        legal = (phase, lc.Install) in lc._TABLE
        assert lc.can_install(phase) is legal


def test_edges_cover_every_row_of_the_table() -> None:
    drawn = {(e.source, e.event) for e in lc.edges()}
    rows = {(p, kind.__name__) for p, kind in lc._TABLE}
    assert drawn == rows - {(Phase.IDLE, "Booted")}  # an idle boot changes nothing
    assert lc.Edge(Phase.TESTING, "Booted", f"into the target slot after {lc.MAX_TRIAL_BOOTS} trial boots",
                   Phase.IDLE, ("BootMarkBad", "Reboot"), None) in lc.edges()
