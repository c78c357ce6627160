"""The install/boot life cycle as a transition table. Pure: no I/O, no clock.

``step(state, event)`` returns the next state plus two lists:
``records`` — journal changes to commit *in the same transaction* as the new
state, and ``actions`` — device side effects for the shell to perform *after*
that transaction is durable. Because state is saved before every side effect and
every action is idempotent, a power cut at any instant leaves a state from which
``Booted`` on the next start resumes or rolls back (see tests/test_lifecycle.py).

    IDLE ──Install──▶ WRITING ──WriteDone──▶ WRITTEN ──TrialSet──▶ TRIAL_PENDING
                         │                                           │ Booted(target)
                  WriteFailed/Booted                                 ▼
                         ▼                     HealthFailed ◀──── TESTING ──HealthPassed──▶ COMMITTING
                        IDLE ◀── Booted(other) ── REVERTING ◀─┘                              │ CommitDone
                                                                                              ▼
                                                                                             IDLE
Modelled on h11's ``_state.py`` (transitions as data, illegal pairs raise) and
Mender's daemon state machine (failure edges written out, a cap on trial boots).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from agent.errors import StateError

MAX_TRIAL_BOOTS = 3


class Phase(enum.StrEnum):
    IDLE = "idle"
    WRITING = "writing"
    WRITTEN = "written"
    TRIAL_PENDING = "trial-pending"
    TESTING = "testing"
    COMMITTING = "committing"
    REVERTING = "reverting"


@dataclass(frozen=True)
class State:
    phase: Phase = Phase.IDLE
    target: str | None = None  # slot being installed or tried
    previous: str | None = None  # the committed slot to fall back to
    version: str | None = None
    security_version: int = 0
    install_boot_id: str | None = None  # the boot during which the install ran
    trial_boots: int = 0
    health: dict[str, Any] | None = None  # per-bundle health overrides

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phase"] = str(self.phase)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        return cls(**{**d, "phase": Phase(d["phase"])})


# --- events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Install:
    target: str
    previous: str
    version: str
    security_version: int
    boot_id: str
    health: dict[str, Any] | None = None


@dataclass(frozen=True)
class WriteDone:
    pass


@dataclass(frozen=True)
class WriteFailed:
    reason: str


@dataclass(frozen=True)
class TrialSet:
    pass


@dataclass(frozen=True)
class Booted:
    slot: str
    boot_id: str


@dataclass(frozen=True)
class HealthPassed:
    detail: str = ""


@dataclass(frozen=True)
class HealthFailed:
    reason: str


@dataclass(frozen=True)
class CommitDone:
    pass


@dataclass(frozen=True)
class Rollback:
    """A person asks to boot the other, known-good slot again."""

    to: str
    version: str | None


Event = (Install | WriteDone | WriteFailed | TrialSet | Booted | HealthPassed | HealthFailed
         | CommitDone | Rollback)


# --- outputs --------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class BootMarkBad:
    slot: str


@dataclass(frozen=True)
class BootSetTrial:
    slot: str


@dataclass(frozen=True)
class BootCommit:
    slot: str


@dataclass(frozen=True)
class RunHealth:
    pass


@dataclass(frozen=True)
class Reboot:
    reason: str


Record = SlotRecord | RaiseFloor | History
Action = BootMarkBad | BootSetTrial | BootCommit | RunHealth | Reboot


@dataclass(frozen=True)
class Transition:
    state: State
    records: list[Record] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)


class IllegalTransition(StateError):
    pass


# Phases in which a new install may start. WRITING and WRITTEN are allowed
# because only a dead installer leaves them (installs hold an exclusive lock).
_CAN_INSTALL = {Phase.IDLE, Phase.WRITING, Phase.WRITTEN, Phase.TRIAL_PENDING}


def step(s: State, ev: Event) -> Transition:
    handler: Any = _TABLE.get((s.phase, type(ev)))
    if handler is None:
        raise IllegalTransition(f"'{type(ev).__name__}' is not possible while the device is {s.phase}")
    result: Transition = handler(s, ev)
    return result


def _install(s: State, ev: Install) -> Transition:
    new = State(Phase.WRITING, ev.target, ev.previous, ev.version, ev.security_version,
                ev.boot_id, 0, ev.health)
    return Transition(
        new,
        [SlotRecord(ev.target, "empty"), History("installing", ev.target, ev.version)],
        [BootMarkBad(ev.target)],  # before the first byte: the slot must never be booted half-written
    )


def _write_done(s: State, ev: WriteDone) -> Transition:
    return Transition(
        replace(s, phase=Phase.WRITTEN),
        [SlotRecord(_t(s), "written", s.version, s.security_version)],
        [BootSetTrial(_t(s))],
    )


def _write_failed(s: State, ev: WriteFailed) -> Transition:
    return Transition(State(), [SlotRecord(_t(s), "empty"),
                                History("failed", s.target, s.version, ev.reason)])


def _trial_set(s: State, ev: TrialSet) -> Transition:
    return Transition(replace(s, phase=Phase.TRIAL_PENDING),
                      [History("installed", s.target, s.version, "reboot to try it once")])


def _fell_back(s: State, booted: str, why: str) -> Transition:
    actions: list[Action] = [BootMarkBad(_t(s))]
    if booted == s.target:  # e.g. the trial-boot cap: the rejected slot is the one running
        actions.append(Reboot(f"{why}; leaving slot {booted}"))
    return Transition(
        State(),
        [SlotRecord(_t(s), "bad", s.version, s.security_version),
         History("reverted", s.target, s.version, f"{why}; running slot {booted}")],
        actions,
    )


def _booted(s: State, ev: Booted) -> Transition:
    same_boot = ev.boot_id == s.install_boot_id
    on_target = ev.slot == s.target
    match s.phase:
        case Phase.IDLE:
            return Transition(s)
        case Phase.WRITING:
            # Mark the half-written slot bad again: power may have failed between the journal
            # write and the bootloader's, leaving an older pending trial of that slot armed.
            if same_boot:  # the installer died, the device did not restart
                return Transition(State(), [SlotRecord(_t(s), "empty"),
                                            History("interrupted", s.target, s.version,
                                                    "installer stopped while writing")],
                                  [BootMarkBad(_t(s))])
            leave: list[Action] = [Reboot("running a slot that was being written")] if on_target else []
            return Transition(State(), [SlotRecord(_t(s), "empty"),
                                        History("interrupted", s.target, s.version,
                                                "power lost while writing")],
                              [BootMarkBad(_t(s)), *leave])
        case Phase.WRITTEN:
            if on_target and not same_boot:
                return _start_trial(s, ev)
            # The payload is complete and was synced; only the trial flag is missing.
            return Transition(s, [], [BootSetTrial(_t(s))])
        case Phase.TRIAL_PENDING:
            if same_boot:
                return Transition(s)
            if on_target:
                return _start_trial(s, ev)
            return _fell_back(s, ev.slot, "the trial boot did not come up (bootloader fell back)")
        case Phase.TESTING:
            if same_boot:  # the agent restarted during health checks: run them again
                return Transition(s, [], [RunHealth()])
            if on_target and s.trial_boots < MAX_TRIAL_BOOTS:
                return _start_trial(s, ev)
            return _fell_back(s, ev.slot, "rebooted during the trial before health checks passed")
        case Phase.COMMITTING:
            if on_target:
                return Transition(s, [], [BootCommit(_t(s))])
            return _fell_back(s, ev.slot, "power lost while committing")
        case Phase.REVERTING:
            if on_target:
                return Transition(s, [], [BootMarkBad(_t(s)), Reboot("finishing the revert")])
            # again, idempotent: power may have failed before the bootloader heard of the revert
            return Transition(State(), [History("reverted", s.target, s.version,
                                                f"running slot {ev.slot} again")],
                              [BootMarkBad(_t(s))])
    raise AssertionError(s.phase)  # pragma: no cover


def _start_trial(s: State, ev: Booted) -> Transition:
    return Transition(
        replace(s, phase=Phase.TESTING, install_boot_id=ev.boot_id, trial_boots=s.trial_boots + 1),
        [SlotRecord(_t(s), "trial", s.version, s.security_version),
         History("trial", s.target, s.version, f"trial boot {s.trial_boots + 1}")],
        [RunHealth()],
    )


def _health_passed(s: State, ev: HealthPassed) -> Transition:
    return Transition(replace(s, phase=Phase.COMMITTING),
                      [History("health-passed", s.target, s.version, ev.detail)], [BootCommit(_t(s))])


def _health_failed(s: State, ev: HealthFailed) -> Transition:
    return Transition(
        replace(s, phase=Phase.REVERTING),
        [SlotRecord(_t(s), "bad", s.version, s.security_version),
         History("health-failed", s.target, s.version, ev.reason)],
        [BootMarkBad(_t(s)), Reboot(f"trial rejected: {ev.reason}")],
    )


def _commit_done(s: State, ev: CommitDone) -> Transition:
    return Transition(
        State(),
        [SlotRecord(_t(s), "good", s.version, s.security_version),
         RaiseFloor(s.security_version),
         History("committed", s.target, s.version)],
    )


def _rollback(s: State, ev: Rollback) -> Transition:
    return Transition(s, [History("rollback", ev.to, ev.version, "requested by operator")],
                      [BootCommit(ev.to), Reboot(f"rolling back to slot {ev.to}")])


def _t(s: State) -> str:
    if s.target is None:
        raise AssertionError(f"phase {s.phase} without a target slot")
    return s.target


_TABLE: dict[tuple[Phase, type], Any] = {
    **{(p, Install): _install for p in _CAN_INSTALL},
    (Phase.WRITING, WriteDone): _write_done,
    (Phase.WRITING, WriteFailed): _write_failed,
    (Phase.WRITTEN, TrialSet): _trial_set,
    (Phase.TESTING, HealthPassed): _health_passed,
    (Phase.TESTING, HealthFailed): _health_failed,
    (Phase.COMMITTING, CommitDone): _commit_done,
    (Phase.IDLE, Rollback): _rollback,
    **{(p, Booted): _booted for p in Phase},
}
