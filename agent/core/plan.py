"""Decide whether a trusted bundle may be installed now, and where (and whether to roll back). Pure.

``plan_install`` takes a manifest that ``agent.core.trust`` already accepted plus the facts
the shell read (the journal's phase, the booted and the bootloader's primary slot, the
board's slots, the device's health policy) and returns the ``InstallPlan`` — target slot,
one write per payload, the fix-ups of the slot's boot files — or raises the refusal a
person can act on. Nothing is touched
before it returns, as RAUC's ``do_install_bundle`` checks everything before it writes.
Whether each payload fits its slot needs the slot's size, so the shell checks that
against ``plan.writes`` before the first byte. ``plan_rollback`` decides a technician's
rollback the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from agent.core import health, lifecycle
from agent.core.fixups import Fixup, SlotFixup, for_install
from agent.core.frozen import Frozen
from agent.core.manifest import Manifest, Payload
from agent.errors import ConfigError, IncompatibleBundle, RollbackRefused, StateError

MODEL_CLASS = "model"  # a model bundle's payload class (agent.core.model_spec.MODEL_CLASS)


class Write(Frozen):
    payload: Payload
    dest: Path  # the target slot's device (or file) for the payload's class


class InstallPlan(Frozen):
    target: str  # the inactive slot, written and then tried once
    previous: str  # the running, committed slot: the fallback of the trial
    writes: tuple[Write, ...]
    health: health.HealthPolicy  # the trial's checks: the device's plus the bundle's
    # applied after the payloads are written and verified, before the trial is armed
    fixups: tuple[SlotFixup, ...] = ()


class Trial(Frozen):
    """A trial waiting for its boot: what the journal (or only the bootloader) knows of it."""

    slot: str
    version: str | None  # None: the bootloader has it armed, the journal does not know it


def pending_trial(state: lifecycle.State, armed: str | None) -> Trial | None:
    """The trial an install would replace: the journal's (written, or armed and waiting for
    its boot), else one that only the bootloader has armed (``armed``: its ``trial()``)."""
    if state.phase in (lifecycle.Phase.WRITTEN, lifecycle.Phase.TRIAL_PENDING) and state.target:
        return Trial(state.target, state.version)
    return Trial(armed, None) if armed is not None else None


def plan_install(manifest: Manifest, *, phase: lifecycle.Phase, booted: str, primary: str,
                 slots: Mapping[str, Mapping[str, Path]],
                 device_health: health.HealthPolicy, pending: Trial | None = None,
                 replace_trial: bool = True, fixups: Iterable[Fixup] = ()) -> InstallPlan:
    """The install of ``manifest``, or the first reason it must not happen (checked in this order:
    the life cycle's phase, the slot the bootloader boots next, a pending trial, the bundle's
    health checks, the payloads' slot classes).

    ``pending``: the trial armed for the next boot, if any. Installing disarms it and
    overwrites its slot — even if the new bundle is then refused half-way — so with
    ``replace_trial=False`` (the command line's default; ``--replace-trial`` says it) that is
    refused instead, naming the trial.
    ``fixups``: the board's per-slot fix-ups; the plan keeps those of the classes it writes."""
    if not lifecycle.can_install(phase):
        raise StateError(f"cannot install while the device is {phase}",
                         hint="let the trial finish ('edgeops agent --once') first")
    if primary != booted:
        # e.g. a rollback armed and its reboot still to come: the inactive slot is the one
        # the bootloader will boot next, and must not be overwritten
        raise StateError(f"the bootloader will boot slot {primary} next, not the running "
                         f"slot {booted}", hint="reboot first, then install")
    if pending is not None and not replace_trial:
        what = f"version {pending.version}" if pending.version else "a trial the journal does not know"
        raise StateError(f"slot {pending.slot} holds {what}, armed to be tried at the next boot",
                         hint="reboot to try it first, or install with --replace-trial to overwrite it")
    target = _other_slot(slots, booted)
    policy = device_health
    if manifest.health:
        try:
            policy = health.parse_policy(manifest.health, base=device_health)
        except ConfigError as exc:
            raise IncompatibleBundle(f"bundle health checks do not fit this device: {exc}") from None
    classes = [p.slot_class for p in manifest.payloads]
    if dup := next((c for c in classes if classes.count(c) > 1), None):
        raise IncompatibleBundle(f"two payloads target slot class '{dup}'; a slot takes one image")
    writes = []
    for p in manifest.payloads:
        dest = slots[target].get(p.slot_class)
        if dest is None:
            if p.slot_class == MODEL_CLASS:
                raise IncompatibleBundle("this is a model bundle",
                                         hint="install it with 'edgeops model install'")
            raise IncompatibleBundle(f"payload '{p.name}' targets class '{p.slot_class}', "
                                     f"which this board has no slot for")
        writes.append(Write(p, dest))
    return InstallPlan(target, booted, tuple(writes), policy,
                       for_install(fixups, target, {w.payload.slot_class: w.dest for w in writes}))


class Held(Protocol):
    """What the journal says a slot holds (``agent.adapters.journal.SlotInfo``)."""

    @property
    def state(self) -> str: ...
    @property
    def version(self) -> str | None: ...
    @property
    def security_version(self) -> int | None: ...


def plan_rollback(*, booted: str, slots: Mapping[str, object], held: Mapping[str, Held],
                  floor: int) -> tuple[str, str | None]:
    """The slot (and its version) a rollback boots: the other slot, if it holds a known-good
    version at or above the device's security floor."""
    other = _other_slot(slots, booted)
    info = held.get(other)
    if info is None or info.state != "good":
        raise StateError(f"slot {other} holds no known-good version to roll back to "
                         f"({info.state if info else 'empty'})")
    if (info.security_version or 0) < floor:
        raise RollbackRefused(f"slot {other} has security_version {info.security_version}, "
                              f"below the device floor {floor}",
                              hint="a release with a security fix cannot be rolled back; "
                                   "install a newer release instead")
    return other, info.version


def _other_slot(slots: Mapping[str, object], slot: str) -> str:
    # as AgentConfig.other_slot: an A/B board has exactly one slot besides the running one
    others = [s for s in slots if s != slot]
    if len(others) != 1:
        raise ConfigError(f"cannot choose the inactive slot: slots are {', '.join(slots)}")
    return others[0]
