"""The install/boot life cycle as a transition table. Pure: no I/O, no clock.

``step(state, event)`` returns the next state plus two lists:
``records`` — journal changes to commit *in the same transaction* as the new
state, and ``actions`` — device side effects for the shell to perform *after*
that transaction is durable — and, in ``then``, the event that follows once those
actions are done (``TrialSet`` after the bootloader armed the trial, ``CommitDone``
after it committed). The shell only feeds events in and performs actions; it never
decides which event comes next. Because state is saved before every side effect and
every action is idempotent, a power cut at any instant leaves a state from which
``Booted`` on the next start resumes or rolls back (see tests/test_lifecycle.py).

The state diagram in docs/lifecycle.md is drawn from this table by ``edges()``
(``tools/lifecycle_diagram.py``; a test fails when the doc is stale), so it cannot
drift from the code. The state record and the journal records (``Phase``, ``State``,
``SlotRecord``...) live in ``agent.core.state``, so that what only reads them (the
journal, ``edgeops status``) does not build the whole table.
Modelled on h11's ``_state.py`` (transitions as data, illegal pairs raise) and
Mender's daemon state machine (failure edges written out, a cap on trial boots).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# re-exported: the life cycle's vocabulary, as every caller has imported it from here
from agent.core.frozen import Frozen, field
from agent.core.records import History as History
from agent.core.records import RaiseFloor as RaiseFloor
from agent.core.records import Record as Record
from agent.core.records import SlotRecord as SlotRecord
from agent.core.state import MAX_TRIAL_BOOTS as MAX_TRIAL_BOOTS
from agent.core.state import Phase as Phase
from agent.core.state import State as State
from agent.errors import StateError


# --- events ---------------------------------------------------------------------------------
class Install(Frozen):
    target: str
    previous: str
    version: str
    security_version: int
    boot_id: str
    health: dict[str, Any] | None = None


class WriteDone(Frozen):
    pass


class WriteFailed(Frozen):
    reason: str


class TrialSet(Frozen):
    pass


class Booted(Frozen):
    slot: str
    boot_id: str


class HealthPassed(Frozen):
    detail: str = ""


class HealthFailed(Frozen):
    reason: str


class SignerDistrusted(Frozen):
    """Health passed, but the trial's signer is revoked or expired now: it must not commit."""

    reason: str


class CommitDone(Frozen):
    pass


class Rollback(Frozen):
    """A person asks to boot the other, known-good slot again."""

    to: str
    version: str | None


class RebootIntoTrial(Frozen):
    """Whoever installed (the fleet agent) wants the armed trial to start now."""

    reason: str


Event = (Install | WriteDone | WriteFailed | TrialSet | Booted | HealthPassed | HealthFailed
         | SignerDistrusted | CommitDone | Rollback | RebootIntoTrial)


# --- outputs --------------------------------------------------------------------------------
class BootMarkBad(Frozen):
    slot: str


class BootSetTrial(Frozen):
    slot: str


class BootCommit(Frozen):
    slot: str


class RunHealth(Frozen):
    pass


class Reboot(Frozen):
    reason: str


Action = BootMarkBad | BootSetTrial | BootCommit | RunHealth | Reboot


class Transition(Frozen):
    state: State
    records: list[Record] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    then: Event | None = None  # fed to ``step`` once every action has been performed


class IllegalTransition(StateError):
    pass


# Phases in which a new install may start. WRITING and WRITTEN are allowed
# because only a dead installer leaves them (installs hold an exclusive lock).
_CAN_INSTALL = {Phase.IDLE, Phase.WRITING, Phase.WRITTEN, Phase.TRIAL_PENDING}


def can_install(phase: Phase) -> bool:
    return phase in _CAN_INSTALL


def needs_cycle(s: State, booted: str, boot_id: str) -> bool:
    """Whether an agent cycle in this boot would do anything: ``Booted`` changes the state,
    records something, acts or leads on. False when idle, and while an armed trial waits for
    its reboot; the idle service asks this before it starts a worker to run the cycle."""
    t = step(s, Booted(booted, boot_id))
    return t.state != s or bool(t.records or t.actions) or t.then is not None


def step(s: State, ev: Event) -> Transition:
    handler = _TABLE.get((s.phase, type(ev)))
    if handler is None:
        raise IllegalTransition(f"'{type(ev).__name__}' is not possible while the device is {s.phase}")
    return handler(s, ev)


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
        s._replace(phase=Phase.WRITTEN),
        [SlotRecord(_t(s), "written", s.version, s.security_version)],
        [BootSetTrial(_t(s))],
        TrialSet(),
    )


def _write_failed(s: State, ev: WriteFailed) -> Transition:
    return Transition(State(), [SlotRecord(_t(s), "empty"),
                                History("failed", s.target, s.version, ev.reason)])


def _trial_set(s: State, ev: TrialSet) -> Transition:
    return Transition(s._replace(phase=Phase.TRIAL_PENDING),
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
            return Transition(s, [], [BootSetTrial(_t(s))], TrialSet())
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
                return Transition(s, [], [BootCommit(_t(s))], CommitDone())
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
        s._replace(phase=Phase.TESTING, install_boot_id=ev.boot_id, trial_boots=s.trial_boots + 1),
        [SlotRecord(_t(s), "trial", s.version, s.security_version),
         History("trial", s.target, s.version, f"trial boot {s.trial_boots + 1}")],
        [RunHealth()],
    )


def _health_passed(s: State, ev: HealthPassed) -> Transition:
    return Transition(s._replace(phase=Phase.COMMITTING),
                      [History("health-passed", s.target, s.version, ev.detail)], [BootCommit(_t(s))],
                      CommitDone())


def _health_failed(s: State, ev: HealthFailed) -> Transition:
    return Transition(
        s._replace(phase=Phase.REVERTING),
        [SlotRecord(_t(s), "bad", s.version, s.security_version),
         History("health-failed", s.target, s.version, ev.reason)],
        [BootMarkBad(_t(s)), Reboot(f"trial rejected: {ev.reason}")],
    )


def _signer_distrusted(s: State, ev: SignerDistrusted) -> Transition:
    # as a failed health check: the slot is rejected and the device returns to the old slot
    return Transition(
        s._replace(phase=Phase.REVERTING),
        [SlotRecord(_t(s), "bad", s.version, s.security_version),
         History("distrusted", s.target, s.version, ev.reason)],
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


def _reboot_into_trial(s: State, ev: RebootIntoTrial) -> Transition:
    return Transition(s, [], [Reboot(ev.reason)])  # the bootloader tries the target once


def _t(s: State) -> str:
    if s.target is None:
        raise AssertionError(f"phase {s.phase} without a target slot")
    return s.target


Handler = Callable[[State, Any], Transition]
_TABLE: dict[tuple[Phase, type], Handler] = {
    **{(p, Install): _install for p in Phase if p in _CAN_INSTALL},  # in order: docs are stable
    (Phase.WRITING, WriteDone): _write_done,
    (Phase.WRITING, WriteFailed): _write_failed,
    (Phase.WRITTEN, TrialSet): _trial_set,
    (Phase.TESTING, HealthPassed): _health_passed,
    (Phase.TESTING, HealthFailed): _health_failed,
    (Phase.TESTING, SignerDistrusted): _signer_distrusted,
    (Phase.COMMITTING, CommitDone): _commit_done,
    (Phase.IDLE, Rollback): _rollback,
    (Phase.TRIAL_PENDING, RebootIntoTrial): _reboot_into_trial,
    **{(p, Booted): _booted for p in Phase},
}


# --- the table as a graph, for docs/lifecycle.md ----------------------------------------------
class Edge(Frozen):
    """One way through the table: ``event`` (in the case ``when``) takes ``source`` to ``target``."""

    source: Phase
    event: str
    when: str  # which case of the event, e.g. "into the target slot"; "" when there is one
    target: Phase
    actions: tuple[str, ...]
    then: str | None  # the event that follows the actions


def edges() -> list[Edge]:
    """Every transition the table makes, found by running ``step`` on one sample of each case.

    Cases that change nothing (no new phase, records, actions or follow-up) are left out;
    cases with the same outcome are merged. The diagram in docs/lifecycle.md is drawn from
    this, so it shows what the code does rather than what someone remembered."""
    found: dict[tuple[Phase, str, Phase, tuple[str, ...], str | None], list[str]] = {}
    for (phase, kind), handler in _TABLE.items():
        for when, state, event in _samples(phase, kind):
            t = handler(state, event)
            if t.state == state and not (t.records or t.actions or t.then):
                continue
            then = type(t.then).__name__ if t.then is not None else None
            key = (phase, kind.__name__, t.state.phase, tuple(type(a).__name__ for a in t.actions), then)
            if when not in found.setdefault(key, []):
                found[key].append(when)
    out = [Edge(src, ev, " or ".join(w for w in whens if w), dst, actions, then)
           for (src, ev, dst, actions, then), whens in found.items()]
    return sorted(out, key=lambda e: list(Phase).index(e.source))  # stable: table order within


def _samples(phase: Phase, kind: type) -> list[tuple[str, State, Any]]:
    # The installer ran on slot A in the boot "b0" and writes B; from TESTING on, the
    # recorded boot is the trial boot, which runs B.
    state = State() if phase is Phase.IDLE else State(phase, "B", "A", "2.0", 1, "b0", 1)
    if kind is not Booted:
        sample: Any = {Install: Install("B", "A", "2.0", 1, "b0"), WriteFailed: WriteFailed("x"),
                       HealthFailed: HealthFailed("x"), SignerDistrusted: SignerDistrusted("x"),
                       Rollback: Rollback("B", "1.0"),
                       RebootIntoTrial: RebootIntoTrial("x")}.get(kind) or kind()
        return [("", state, sample)]
    trial_ran = phase in (Phase.TESTING, Phase.COMMITTING, Phase.REVERTING)
    out = [("same boot", state, Booted("B" if trial_ran else "A", "b0")),
           ("into the target slot", state, Booted("B", "b1")),
           ("into the other slot", state, Booted("A", "b1"))]
    if phase is Phase.TESTING:
        capped = state._replace(trial_boots=MAX_TRIAL_BOOTS)
        out.append((f"into the target slot after {MAX_TRIAL_BOOTS} trial boots", capped,
                    Booted("B", "b1")))
    return out
